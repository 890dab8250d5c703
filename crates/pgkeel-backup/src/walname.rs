//! Names of the files postgres archives, and WAL segment arithmetic.
//!
//! - a segment: 24 hex digits, timeline + log + segment, e.g. `000000010000000000000003`;
//! - a partial segment (the last one of a timeline, archived after a promotion):
//!   `000000010000000000000003.partial`;
//! - a backup history file: `000000010000000000000002.00000028.backup`;
//! - a timeline history file: `00000002.history`.

use std::fmt;

/// One archivable file name, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WalFile {
    /// A full WAL segment.
    Segment(SegmentName),
    /// A partial segment (`.partial`).
    Partial(SegmentName),
    /// A backup history file (`.backup`) written by `pg_backup_stop`; `offset` is the
    /// 8-hex-digit start offset in its name.
    BackupHistory(SegmentName, String),
    /// A timeline history file (`.history`).
    History(u32),
}

/// Timeline, log and segment of a WAL segment file name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegmentName {
    /// Timeline.
    pub timeline: u32,
    /// High 32 bits of the segment's LSN.
    pub log: u32,
    /// Segment number within `log`.
    pub seg: u32,
}

impl fmt::Display for SegmentName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08X}{:08X}{:08X}", self.timeline, self.log, self.seg)
    }
}

fn hex8(s: &str) -> Option<u32> {
    (s.len() == 8 && s.bytes().all(|b| b.is_ascii_hexdigit())).then(|| u32::from_str_radix(s, 16).ok()).flatten()
}

impl SegmentName {
    /// Parses exactly 24 hex digits.
    pub fn parse(s: &str) -> Option<SegmentName> {
        if s.len() != 24 || !s.is_ascii() {
            return None;
        }
        Some(SegmentName { timeline: hex8(&s[0..8])?, log: hex8(&s[8..16])?, seg: hex8(&s[16..24])? })
    }

    /// The segment holding `lsn` on `timeline`, for segments of `seg_size` bytes.
    pub fn from_lsn(timeline: u32, lsn: u64, seg_size: u64) -> SegmentName {
        let per_log = segments_per_log(seg_size);
        let segno = lsn / seg_size;
        SegmentName { timeline, log: (segno / per_log) as u32, seg: (segno % per_log) as u32 }
    }

    /// The segment number counted from LSN 0 (timeline ignored).
    pub fn segno(&self, seg_size: u64) -> u64 {
        u64::from(self.log) * segments_per_log(seg_size) + u64::from(self.seg)
    }

    /// The segment with number `segno` on `timeline`.
    pub fn from_segno(timeline: u32, segno: u64, seg_size: u64) -> SegmentName {
        let per_log = segments_per_log(seg_size);
        SegmentName { timeline, log: (segno / per_log) as u32, seg: (segno % per_log) as u32 }
    }
}

/// How many segments make up one "log" (4 GiB of WAL): 256 for 16 MiB segments.
fn segments_per_log(seg_size: u64) -> u64 {
    (0x1_0000_0000 / seg_size.max(1)).max(1)
}

/// Whether `n` is a WAL segment size postgres accepts (a power of two from 1 MiB to 1 GiB).
pub fn valid_segment_size(n: u64) -> bool {
    n.is_power_of_two() && (1 << 20..=1 << 30).contains(&n)
}

impl WalFile {
    /// Parses a file name as postgres passes it in `%f` (no directory).
    pub fn parse(name: &str) -> Option<WalFile> {
        if let Some(tli) = name.strip_suffix(".history") {
            return hex8(tli).filter(|t| *t > 0).map(WalFile::History);
        }
        if let Some(seg) = name.strip_suffix(".partial") {
            return SegmentName::parse(seg).map(WalFile::Partial);
        }
        if let Some(rest) = name.strip_suffix(".backup") {
            let (seg, offset) = rest.split_once('.')?;
            hex8(offset)?;
            return SegmentName::parse(seg).map(|s| WalFile::BackupHistory(s, offset.to_string()));
        }
        SegmentName::parse(name).map(WalFile::Segment)
    }

    /// The directory (below the cluster's `wal/`) the file is archived in: `history` for
    /// timeline history files, else the first 16 hex digits of the segment name (timeline and
    /// log), so that no directory holds more than 4 GiB worth of segments.
    pub fn archive_dir(&self) -> String {
        match self {
            WalFile::History(_) => "history".to_string(),
            WalFile::Segment(s) | WalFile::Partial(s) | WalFile::BackupHistory(s, _) => {
                format!("{:08X}{:08X}", s.timeline, s.log)
            }
        }
    }
}

impl fmt::Display for WalFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WalFile::Segment(s) => write!(f, "{s}"),
            WalFile::Partial(s) => write!(f, "{s}.partial"),
            WalFile::BackupHistory(s, off) => write!(f, "{s}.{off}.backup"),
            WalFile::History(t) => write!(f, "{t:08X}.history"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB16: u64 = 16 << 20;

    #[test]
    fn parse_names() {
        let s = SegmentName { timeline: 1, log: 0, seg: 3 };
        assert_eq!(WalFile::parse("000000010000000000000003"), Some(WalFile::Segment(s)));
        assert_eq!(WalFile::parse("000000010000000000000003.partial"), Some(WalFile::Partial(s)));
        assert_eq!(
            WalFile::parse("000000010000000000000003.00000028.backup"),
            Some(WalFile::BackupHistory(s, "00000028".into()))
        );
        assert_eq!(WalFile::parse("0000000A.history"), Some(WalFile::History(10)));
        assert_eq!(
            WalFile::parse("0000000a0000000F000000FF"),
            Some(WalFile::Segment(SegmentName { timeline: 10, log: 15, seg: 255 }))
        );
        for bad in [
            "",
            "00000001000000000000003",
            "0000000100000000000000033",
            "00000001000000000000000G",
            "00000000.history",
            "0001.history",
            "../00000001.history",
            "000000010000000000000003.00000028",
            "000000010000000000000003.0000002X.backup",
            "RECOVERYXLOG",
            "00000001/0000000000000003",
        ] {
            assert_eq!(WalFile::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn names_round_trip_and_dirs() {
        for name in [
            "000000010000000000000003",
            "000000020000000100000000.partial",
            "000000010000000000000002.00000028.backup",
            "00000002.history",
        ] {
            assert_eq!(WalFile::parse(name).unwrap().to_string(), name);
        }
        assert_eq!(WalFile::parse("0000000200000001000000FE").unwrap().archive_dir(), "0000000200000001");
        assert_eq!(WalFile::parse("00000002.history").unwrap().archive_dir(), "history");
    }

    #[test]
    fn lsn_to_segment() {
        assert_eq!(SegmentName::from_lsn(1, 0x3000148, MB16).to_string(), "000000010000000000000003");
        assert_eq!(SegmentName::from_lsn(2, (1 << 32) | 0xFF00_0000, MB16).to_string(), "0000000200000001000000FF");
        // 64 MiB segments: 64 per log.
        let s = SegmentName::from_lsn(1, (3 << 32) | 0x0C00_0000, 64 << 20);
        assert_eq!(s.to_string(), "000000010000000300000003");
        assert_eq!(s.segno(64 << 20), 3 * 64 + 3);
        assert_eq!(SegmentName::from_segno(1, 3 * 64 + 3, 64 << 20), s);
        let n = SegmentName::parse("0000000100000001000000FF").unwrap();
        assert_eq!(SegmentName::from_segno(1, n.segno(MB16) + 1, MB16).to_string(), "000000010000000200000000");
        assert!(valid_segment_size(MB16) && valid_segment_size(1 << 30) && !valid_segment_size(3 << 20));
    }
}
