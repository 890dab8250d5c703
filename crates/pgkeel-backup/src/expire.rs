//! Retention: `pgkeel backup expire`.
//!
//! - Complete backups (or dumps) are kept by count (`keep`: the newest N) and/or by age
//!   (`max_age`: a recovery window: every backup that ended within it, plus the newest one
//!   that ended before it, which restoring to the start of the window needs). A backup is
//!   removed only when no given rule keeps it, and the newest complete one is always kept.
//! - A kept differential or incremental backup keeps every backup that stores some of its
//!   files (its full backup, and for an incremental the backups in between that it shares
//!   files with), whatever the rules say.
//! - Incomplete ones (no manifest) are removed when both their label and their newest stored
//!   file are more than an hour old (a backup still being written is younger).
//! - WAL: every archived segment, `.partial` and `.backup` file before the segment holding
//!   the oldest retained backup's start LSN is removed, on every timeline; timeline history
//!   files are kept. No WAL is removed while there is no complete backup.
//!
//! A backup is removed manifest first: interrupted halfway, it is left incomplete (never
//! used) and removed by the next run.

use std::collections::HashMap;

use anyhow::{bail, Context};

use crate::repo::Repo;
use crate::timefmt::now_us;
use crate::walname::{SegmentName, WalFile};

/// How long an incomplete backup or dump is left alone (it may still be running).
pub const INCOMPLETE_GRACE_US: i64 = 3600 * 1_000_000;

/// What to keep.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    /// Keep the newest N complete ones.
    pub keep: Option<usize>,
    /// Keep a recovery window of this many microseconds.
    pub max_age_us: Option<i64>,
}

/// Which of the complete items, by end time oldest first, to keep (see the module doc).
pub fn retained(times: &[i64], r: &Retention, now_us: i64) -> Vec<bool> {
    let n = times.len();
    let mut keep = vec![false; n];
    if n == 0 {
        return keep;
    }
    keep[n - 1] = true;
    if let Some(k) = r.keep {
        for flag in keep.iter_mut().skip(n.saturating_sub(k)) {
            *flag = true;
        }
    }
    if let Some(age) = r.max_age_us {
        let cutoff = now_us.saturating_sub(age);
        for (flag, t) in keep.iter_mut().zip(times) {
            if *t >= cutoff {
                *flag = true;
            }
        }
        if let Some(i) = (0..n).rev().find(|&i| times[i] < cutoff) {
            keep[i] = true;
        }
    }
    keep
}

/// The time a label (`YYYYMMDDTHHMMSSZ`, maybe with `-N`) stands for, in microseconds.
pub fn label_time_us(label: &str) -> Option<i64> {
    let s = label.get(..16).filter(|s| s.is_ascii())?;
    let b = s.as_bytes();
    if b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let iso = format!("{}-{}-{} {}:{}:{}Z", &s[0..4], &s[4..6], &s[6..8], &s[9..11], &s[11..13], &s[13..15]);
    crate::timefmt::parse_timestamp(&iso).ok()
}

/// One thing removed (or that would be, in a dry run).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removed {
    /// The backup's (or dump's) label.
    pub label: String,
    /// Why.
    pub reason: String,
    /// Stored bytes.
    pub bytes: u64,
}

/// What `expire` did (or, in a dry run, would do).
#[derive(Debug, Clone, Default)]
pub struct ExpireReport {
    /// Labels kept, oldest first.
    pub kept: Vec<String>,
    /// Complete and incomplete ones removed.
    pub removed: Vec<Removed>,
    /// WAL files removed and their stored size.
    pub wal_files: usize,
    /// See [`ExpireReport::wal_files`].
    pub wal_bytes: u64,
    /// The first segment kept (WAL before it is removed), when WAL expiry applies.
    pub wal_kept_from: Option<String>,
    /// Nothing was deleted.
    pub dry_run: bool,
}

/// A backup or dump found in the repository.
struct Item {
    label: String,
    prefix: String,
    /// End time, for complete ones.
    end_us: Option<i64>,
    /// Whether there is a manifest that could not be read (kept, reported elsewhere).
    damaged: bool,
}

/// Sizes and newest write time of every object below each `<kind>/<label>/`.
fn usage(repo: &Repo, kind: &str) -> anyhow::Result<HashMap<String, (u64, i64)>> {
    let base = format!("{}/{kind}/", repo.cluster());
    let mut out: HashMap<String, (u64, i64)> = HashMap::new();
    for o in repo.storage().list_tree(base.trim_end_matches('/'))? {
        let Some(rest) = o.key.strip_prefix(&base) else { continue };
        let Some((label, _)) = rest.split_once('/') else { continue };
        let e = out.entry(label.to_string()).or_default();
        e.0 += o.size;
        e.1 = e.1.max(o.modified_us);
    }
    Ok(out)
}

/// Applies `r` to `items` (each with its `manifest.json`); removes (unless `dry_run`) and
/// reports. `deps` names, per label, the other items it needs (kept along with it). Returns
/// the labels kept.
#[allow(clippy::too_many_arguments)]
fn expire_items(
    repo: &Repo,
    kind: &str,
    mut items: Vec<Item>,
    deps: &HashMap<String, Vec<String>>,
    r: &Retention,
    now: i64,
    dry_run: bool,
    report: &mut ExpireReport,
) -> anyhow::Result<Vec<String>> {
    let usage = usage(repo, kind)?;
    items.sort_by(|a, b| (a.end_us, &a.label).cmp(&(b.end_us, &b.label)));
    let complete: Vec<&Item> = items.iter().filter(|i| i.end_us.is_some()).collect();
    let times: Vec<i64> = complete.iter().map(|i| i.end_us.unwrap_or_default()).collect();
    let mut keep = retained(&times, r, now);
    let needed: std::collections::HashSet<&str> = complete
        .iter()
        .zip(&keep)
        .filter(|(_, k)| **k)
        .flat_map(|(i, _)| deps.get(&i.label).into_iter().flatten().map(String::as_str))
        .collect();
    for (item, keep) in complete.iter().zip(keep.iter_mut()) {
        if needed.contains(item.label.as_str()) {
            *keep = true;
        }
    }
    let mut kept = Vec::new();
    let mut remove = Vec::new();
    for (item, keep) in complete.iter().zip(&keep) {
        if *keep {
            kept.push(item.label.clone());
        } else {
            let reason = match (r.keep, r.max_age_us) {
                (Some(k), None) => format!("not among the newest {k}"),
                (None, Some(_)) => "older than the recovery window".to_string(),
                _ => format!("not among the newest {} and older than the recovery window", r.keep.unwrap_or(0)),
            };
            remove.push((*item, reason));
        }
    }
    for item in items.iter().filter(|i| i.end_us.is_none() && !i.damaged) {
        let (_, newest_write) = usage.get(&item.label).copied().unwrap_or((0, 0));
        let started = label_time_us(&item.label).unwrap_or(0);
        if started.max(newest_write) < now - INCOMPLETE_GRACE_US {
            remove.push((item, "incomplete (no manifest) and untouched for over an hour".to_string()));
        }
    }
    for (item, reason) in remove {
        let bytes = usage.get(&item.label).map_or(0, |u| u.0);
        if !dry_run {
            // Manifest first: from then on the backup is incomplete and never used.
            let manifest = format!("{}/manifest.json", item.prefix);
            repo.storage().delete(&manifest).with_context(|| format!("deleting {manifest}"))?;
            repo.storage().delete_tree(&item.prefix).with_context(|| format!("deleting {}", item.prefix))?;
        }
        report.removed.push(Removed { label: item.label.clone(), reason, bytes });
    }
    Ok(kept)
}

/// Applies the retention to the base backups and the WAL of `repo`.
pub fn expire_backups(repo: &Repo, r: &Retention, dry_run: bool) -> anyhow::Result<ExpireReport> {
    if r.keep.is_none() && r.max_age_us.is_none() {
        bail!("say what to keep: --keep N and/or --max-age AGE");
    }
    if r.keep == Some(0) {
        bail!("--keep 0 would remove every backup: keep at least 1");
    }
    repo.check()?;
    let now = now_us();
    let mut report = ExpireReport { dry_run, ..Default::default() };
    let entries = repo.list_backups()?;
    let mut manifests = HashMap::new();
    let mut items = Vec::new();
    let mut deps = HashMap::new();
    for e in entries {
        let prefix = repo.backup_prefix(&e.label);
        let damaged = e.manifest.is_none() && repo.storage().exists(&repo.manifest_key(&e.label))?;
        let end_us = e.manifest.as_ref().map(|m| m.stop_time_us);
        if let Some(m) = e.manifest {
            deps.insert(e.label.clone(), m.depends_on());
            manifests.insert(e.label.clone(), m);
        }
        items.push(Item { label: e.label, prefix, end_us, damaged });
    }
    let kept = expire_items(repo, "backups", items, &deps, r, now, dry_run, &mut report)?;

    // WAL before the oldest retained backup's start segment.
    let mut first: Option<(u64, u64, SegmentName)> = None;
    for m in kept.iter().filter_map(|l| manifests.get(l)) {
        let start = m.start_lsn_value().map_err(anyhow::Error::msg)?;
        let seg = SegmentName::from_lsn(m.start_timeline, start, m.wal_segment_size);
        let segno = seg.segno(m.wal_segment_size);
        if first.is_none_or(|(s, _, _)| segno < s) {
            first = Some((segno, m.wal_segment_size, seg));
        }
    }
    if let Some((first_segno, seg_size, seg)) = first {
        report.wal_kept_from = Some(seg.to_string());
        let base = format!("{}/wal/", repo.cluster());
        let mut doomed = Vec::new();
        for o in repo.storage().list_tree(base.trim_end_matches('/'))? {
            let Some(name) = o.key.rsplit('/').next().and_then(|n| n.strip_suffix(".zst")) else { continue };
            let segment = match WalFile::parse(name) {
                Some(WalFile::Segment(s) | WalFile::Partial(s) | WalFile::BackupHistory(s, _)) => s,
                Some(WalFile::History(_)) | None => continue,
            };
            if segment.segno(seg_size) < first_segno {
                report.wal_bytes += o.size;
                doomed.push(o.key);
            }
        }
        report.wal_files = doomed.len();
        if !dry_run {
            repo.storage().delete_keys(&doomed).context("deleting expired WAL")?;
        }
    }
    report.kept = kept;
    Ok(report)
}

/// Applies the retention to the logical dumps of `repo`.
pub fn expire_dumps(repo: &Repo, r: &Retention, dry_run: bool) -> anyhow::Result<ExpireReport> {
    if r.keep.is_none() && r.max_age_us.is_none() {
        bail!("say what to keep: --keep N and/or --max-age AGE");
    }
    if r.keep == Some(0) {
        bail!("--keep 0 would remove every dump: keep at least 1");
    }
    repo.check()?;
    let now = now_us();
    let mut report = ExpireReport { dry_run, ..Default::default() };
    let mut items = Vec::new();
    for e in crate::dump::list_dumps(repo)? {
        let prefix = repo.dump_prefix(&e.label);
        let damaged = e.manifest.is_none() && repo.storage().exists(&format!("{prefix}/manifest.json"))?;
        let end_us = e.manifest.as_ref().map(|m| m.stop_time_us);
        items.push(Item { label: e.label, prefix, end_us, damaged });
    }
    report.kept = expire_items(repo, "dumps", items, &HashMap::new(), r, now, dry_run, &mut report)?;
    Ok(report)
}

/// Parses an age: a number followed by `s`, `m`, `h`, `d` or `w` (e.g. `14d`, `36h`);
/// returns microseconds.
pub fn parse_age(s: &str) -> Result<i64, String> {
    let secs = pgkeel_config::parse_age(s)?;
    i64::try_from(secs).ok().and_then(|v| v.checked_mul(1_000_000)).ok_or_else(|| format!("age {s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = 3600 * 1_000_000;
    const D: i64 = 24 * H;

    #[test]
    fn retention_rules() {
        let now = 100 * D;
        // Backups ended 10, 8, 6, 4, 2 and 0.5 days ago.
        let times = [now - 10 * D, now - 8 * D, now - 6 * D, now - 4 * D, now - 2 * D, now - D / 2];
        let keep = |r: Retention| -> Vec<usize> {
            retained(&times, &r, now).iter().enumerate().filter(|(_, k)| **k).map(|(i, _)| i).collect()
        };
        assert_eq!(keep(Retention { keep: Some(2), max_age_us: None }), [4, 5]);
        assert_eq!(keep(Retention { keep: Some(1), max_age_us: None }), [5]);
        assert_eq!(keep(Retention { keep: Some(99), max_age_us: None }), [0, 1, 2, 3, 4, 5]);
        // A 5-day window: the backups of the last 5 days and the one just before (6 days ago).
        assert_eq!(keep(Retention { keep: None, max_age_us: Some(5 * D) }), [2, 3, 4, 5]);
        // Either rule keeps.
        assert_eq!(keep(Retention { keep: Some(5), max_age_us: Some(D) }), [1, 2, 3, 4, 5]);
        assert_eq!(keep(Retention { keep: Some(1), max_age_us: Some(3 * D) }), [3, 4, 5]);
        // The newest is always kept, even when the window is empty of backups.
        assert_eq!(keep(Retention { keep: None, max_age_us: Some(H) }), [5]);
        assert!(retained(&[], &Retention { keep: Some(1), max_age_us: None }, now).is_empty());
    }

    #[test]
    fn ages_and_labels() {
        assert_eq!(parse_age("14d"), Ok(14 * D));
        assert_eq!(parse_age("36h"), Ok(36 * H));
        assert_eq!(parse_age("2w"), Ok(14 * D));
        assert_eq!(parse_age("90m"), Ok(90 * 60 * 1_000_000));
        for bad in ["", "d", "14", "14y", "-1d", "0d", "1.5d"] {
            assert!(parse_age(bad).is_err(), "{bad:?}");
        }
        let t = label_time_us("20240501T123000Z").unwrap();
        assert_eq!(crate::timefmt::label_utc(t), "20240501T123000Z");
        assert_eq!(label_time_us("20240501T123000Z-2"), Some(t));
        assert_eq!(label_time_us("nightly"), None);
        assert_eq!(label_time_us("2024050112300000"), None);
    }
}
