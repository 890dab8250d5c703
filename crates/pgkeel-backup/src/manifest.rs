//! The backup manifest (`manifest.json`), written last: a backup without one is incomplete
//! and never used.

use serde::{Deserialize, Serialize};

use crate::walname::SegmentName;

/// Current manifest format.
pub const FORMAT: u32 = 1;

/// Everything known about one base backup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Manifest format ([`FORMAT`]).
    pub format: u32,
    /// Backup label (its directory name), e.g. `20240501T123000Z`.
    pub label: String,
    /// Cluster name (the repository directory).
    pub cluster: String,
    /// `Database system identifier` of the source.
    pub system_identifier: String,
    /// `server_version_num` of the source, e.g. 150004.
    pub server_version_num: u32,
    /// Whether it was taken on a standby.
    pub from_standby: bool,
    /// Full, differential or incremental.
    #[serde(default)]
    pub kind: BackupKind,
    /// For a differential or incremental backup, the backup it was compared with. Files that
    /// did not change are not stored again: their [`FileEntry::stored_in`] names the backup
    /// that holds them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// Where it was taken: `HOST:DATA_DIRECTORY`. Modification times only mean something
    /// on the same copy of the data, so a later backup elsewhere compares by content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The pgkeel version that wrote it.
    pub pgkeel_version: String,
    /// Start, by the database server's clock, in microseconds since the epoch.
    pub start_time_us: i64,
    /// End (after `pg_backup_stop` returned), by the database server's clock.
    pub stop_time_us: i64,
    /// Start LSN (`START WAL LOCATION` in the backup label), e.g. `0/2000028`.
    pub start_lsn: String,
    /// Stop LSN returned by `pg_backup_stop`: the restored server is consistent once it has
    /// replayed up to here.
    pub stop_lsn: String,
    /// Timeline at the start.
    pub start_timeline: u32,
    /// `wal_segment_size` in bytes.
    pub wal_segment_size: u64,
    /// Oldest transaction still running at the start (`pg_snapshot_xmin`, with epoch): every
    /// transaction id below it had ended before the backup started.
    pub start_xmin: u64,
    /// `backup_label` content returned by `pg_backup_stop`.
    pub backup_label: String,
    /// `tablespace_map` content returned by `pg_backup_stop` (empty without tablespaces).
    pub tablespace_map: String,
    /// Directories to create on restore (relative to the data directory), with their mode.
    pub directories: Vec<DirEntry>,
    /// Every file copied.
    pub files: Vec<FileEntry>,
}

/// One directory of the data directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    /// Relative path.
    pub path: String,
    /// Permission bits.
    pub mode: u32,
}

/// One file of the data directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Relative path in the data directory (the stored object is `data/<path>.zst`).
    pub path: String,
    /// Uncompressed size (as copied; a file may change size while it is copied, WAL replay
    /// repairs that).
    pub size: u64,
    /// Size of the stored (compressed) object.
    pub stored_size: u64,
    /// SHA-256 of the uncompressed content as copied, lowercase hex.
    pub sha256: String,
    /// Permission bits.
    pub mode: u32,
    /// Modification time when copied, in nanoseconds since the epoch: a later differential
    /// or incremental backup re-reads a file only when its size and time are unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtime_ns: Option<i64>,
    /// The backup whose `data/<path>.zst` holds this file, when it is not this backup (the
    /// file was unchanged since an earlier backup). Always the backup that stores the object,
    /// never an intermediate one, so restore reads it in one step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored_in: Option<String>,
}

/// What a backup contains.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackupKind {
    /// Every file.
    #[default]
    Full,
    /// The files changed since the newest full backup.
    Diff,
    /// The files changed since the newest backup of any kind.
    Incr,
}

impl BackupKind {
    /// `full`, `diff` or `incr`.
    pub fn as_str(self) -> &'static str {
        match self {
            BackupKind::Full => "full",
            BackupKind::Diff => "diff",
            BackupKind::Incr => "incr",
        }
    }

    /// Parses `full`, `diff`/`differential` or `incr`/`incremental`.
    pub fn parse(s: &str) -> Result<BackupKind, String> {
        match s {
            "full" => Ok(BackupKind::Full),
            "diff" | "differential" => Ok(BackupKind::Diff),
            "incr" | "incremental" => Ok(BackupKind::Incr),
            other => Err(format!("unknown backup type {other:?}: use full, diff or incr")),
        }
    }
}

impl FileEntry {
    /// The label of the backup that stores this file's object, given the manifest listing it.
    pub fn holder<'a>(&'a self, m: &'a Manifest) -> &'a str {
        self.stored_in.as_deref().unwrap_or(&m.label)
    }
}

impl Manifest {
    /// The other backups this one needs (those storing some of its files), sorted.
    pub fn depends_on(&self) -> Vec<String> {
        let set: std::collections::BTreeSet<&str> =
            self.files.iter().filter_map(|f| f.stored_in.as_deref()).filter(|l| *l != self.label).collect();
        set.into_iter().map(str::to_string).collect()
    }

    /// Total uncompressed size of the files.
    pub fn total_size(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// Total stored size of the files this backup stores itself (not those it shares with an
    /// earlier backup).
    pub fn stored_size(&self) -> u64 {
        self.files.iter().filter(|f| f.stored_in.is_none()).map(|f| f.stored_size).sum()
    }

    /// Start LSN as a number.
    pub fn start_lsn_value(&self) -> Result<u64, String> {
        pgkeel_pg::lsn::parse_lsn(&self.start_lsn)
            .ok_or_else(|| format!("manifest of backup {}: bad start_lsn {:?}", self.label, self.start_lsn))
    }

    /// Stop LSN as a number.
    pub fn stop_lsn_value(&self) -> Result<u64, String> {
        pgkeel_pg::lsn::parse_lsn(&self.stop_lsn)
            .ok_or_else(|| format!("manifest of backup {}: bad stop_lsn {:?}", self.label, self.stop_lsn))
    }

    /// Numbers of the WAL segments recovery needs from the archive to make this backup
    /// consistent: from the one holding the start LSN to the one holding the stop LSN.
    pub fn required_segnos(&self) -> Result<std::ops::RangeInclusive<u64>, String> {
        let (start, stop) = (self.start_lsn_value()?, self.stop_lsn_value()?);
        if stop < start {
            return Err(format!("manifest of backup {}: stop_lsn is before start_lsn", self.label));
        }
        let sz = self.wal_segment_size;
        let first = SegmentName::from_lsn(self.start_timeline, start, sz).segno(sz);
        // The stop LSN points just past the last record; when it sits exactly on a segment
        // boundary that next segment holds nothing the backup needs.
        let last = SegmentName::from_lsn(self.start_timeline, stop.saturating_sub(1).max(start), sz).segno(sz);
        Ok(first..=last)
    }
}

/// Parses `START WAL LOCATION: 0/2000028 (file 000000010000000000000002)` and
/// `START TIMELINE: 1` out of a backup_label.
pub fn parse_backup_label(label: &str) -> Result<(u64, u32), String> {
    let field = |name: &str| {
        label
            .lines()
            .find_map(|l| l.strip_prefix(name).map(str::trim))
            .ok_or_else(|| format!("backup_label has no {name:?} line:\n{label}"))
    };
    let loc = field("START WAL LOCATION:")?;
    let lsn_text = loc.split_whitespace().next().unwrap_or_default();
    let lsn = pgkeel_pg::lsn::parse_lsn(lsn_text).ok_or_else(|| format!("backup_label: bad start LSN {loc:?}"))?;
    let tli = field("START TIMELINE:")?;
    let tli = tli.parse().map_err(|_| format!("backup_label: bad START TIMELINE {tli:?}"))?;
    Ok((lsn, tli))
}

#[cfg(test)]
pub(crate) fn sample(label: &str, stop_time_us: i64, stop_lsn: &str) -> Manifest {
    Manifest {
        format: FORMAT,
        label: label.into(),
        cluster: "c".into(),
        system_identifier: "7312345678901234567".into(),
        server_version_num: 150004,
        from_standby: false,
        kind: BackupKind::Full,
        reference: None,
        source: None,
        pgkeel_version: "0.1.0".into(),
        start_time_us: stop_time_us - 1_000_000,
        stop_time_us,
        start_lsn: "0/2000028".into(),
        stop_lsn: stop_lsn.into(),
        start_timeline: 1,
        wal_segment_size: 16 << 20,
        start_xmin: 740,
        backup_label: String::new(),
        tablespace_map: String::new(),
        directories: vec![DirEntry { path: "pg_wal".into(), mode: 0o700 }],
        files: vec![FileEntry {
            path: "PG_VERSION".into(),
            size: 3,
            stored_size: 12,
            sha256: "ab".into(),
            mode: 0o600,
            mtime_ns: None,
            stored_in: None,
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip() {
        let m = sample("20240501T123000Z", 1_714_566_600_000_000, "0/3000100");
        let text = serde_json::to_string_pretty(&m).unwrap();
        assert!(text.contains("\"sha256\": \"ab\""));
        let back: Manifest = serde_json::from_str(&text).unwrap();
        assert_eq!(back, m);
        assert_eq!(m.total_size(), 3);
        assert_eq!(m.stored_size(), 12);
    }

    #[test]
    fn older_manifests_read_as_full_backups() {
        let m = sample("20240501T123000Z", 1_714_566_600_000_000, "0/3000100");
        let mut v = serde_json::to_value(&m).unwrap();
        v.as_object_mut().unwrap().remove("kind");
        let back: Manifest = serde_json::from_value(v).unwrap();
        assert_eq!(back.kind, BackupKind::Full);
        assert!(back.depends_on().is_empty());
    }

    #[test]
    fn dependencies_and_stored_size() {
        let mut m = sample("b2", 1, "0/3000100");
        m.kind = BackupKind::Incr;
        m.reference = Some("b1".into());
        let shared = FileEntry { path: "base/1/1".into(), stored_in: Some("b0".into()), ..m.files[0].clone() };
        let shared2 = FileEntry { path: "base/1/2".into(), stored_in: Some("b1".into()), ..m.files[0].clone() };
        m.files.push(shared.clone());
        m.files.push(shared2);
        assert_eq!(m.depends_on(), vec!["b0".to_string(), "b1".to_string()]);
        assert_eq!(m.stored_size(), 12, "shared files count where they are stored");
        assert_eq!(shared.holder(&m), "b0");
        assert_eq!(m.files[0].holder(&m), "b2");
        assert_eq!(BackupKind::parse("incremental"), Ok(BackupKind::Incr));
        assert!(BackupKind::parse("partial").is_err());
    }

    #[test]
    fn required_segments() {
        let m = sample("l", 0, "0/3000100");
        assert_eq!(m.required_segnos().unwrap(), 2..=3);
        let m = Manifest { stop_lsn: "0/3000000".into(), ..m };
        assert_eq!(m.required_segnos().unwrap(), 2..=2, "a stop exactly on a boundary needs no next segment");
        let m = Manifest { stop_lsn: "0/2000100".into(), ..m };
        assert_eq!(m.required_segnos().unwrap(), 2..=2);
        let m = Manifest { stop_lsn: "0/1000000".into(), ..m };
        assert!(m.required_segnos().is_err());
    }

    #[test]
    fn backup_label_parsing() {
        let label = "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n\
                     CHECKPOINT LOCATION: 0/2000060\n\
                     BACKUP METHOD: streamed\n\
                     BACKUP FROM: primary\n\
                     START TIME: 2024-05-01 12:30:00 UTC\n\
                     LABEL: x\n\
                     START TIMELINE: 3\n";
        assert_eq!(parse_backup_label(label), Ok((0x2000028, 3)));
        assert!(parse_backup_label("nothing").is_err());
    }
}
