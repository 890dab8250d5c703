//! Timeline history files and the "can this node stream from that timeline" check.
//!
//! After a promotion postgres starts a new timeline N and writes `pg_wal/%08X.history` for
//! it: one line per ancestor timeline, `parentTLI<TAB>switchpoint<TAB>reason`, where the
//! switchpoint is the LSN at which the parent's WAL stops being part of timeline N. A former
//! primary can become a replica of the new timeline without pg_rewind only if all of its WAL
//! lies before the switchpoint of its own timeline.

use crate::lsn::parse_lsn;

/// Parses a timeline history file into `(parent timeline, switchpoint LSN)` entries, oldest
/// first. Comment and blank lines are skipped, and so are malformed lines.
pub fn parse_history(text: &str) -> Vec<(u32, u64)> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                return None;
            }
            let mut fields = line.split_whitespace();
            let tli = fields.next()?.parse().ok()?;
            let lsn = parse_lsn(fields.next()?)?;
            Some((tli, lsn))
        })
        .collect()
}

/// Whether WAL on `my_timeline` ending at `my_end_lsn` is a prefix of the timeline whose
/// history is `history` (so this node can stream from it without pg_rewind).
///
/// True if the history has an entry for `my_timeline` whose switchpoint is at or after
/// `my_end_lsn`, or if `my_timeline` is not an ancestor but newer than every ancestor (it is
/// then taken to be the history's own, newest timeline: nothing diverged). False if
/// `my_timeline` branched off before `my_end_lsn` or is an older timeline that is not in the
/// ancestry at all.
///
/// The history alone does not name its own timeline, so a sibling timeline newer than all
/// ancestors cannot be told apart from the newest one; use [`can_follow_timeline`] when the
/// target timeline is known.
pub fn can_follow(history: &[(u32, u64)], my_timeline: u32, my_end_lsn: u64) -> bool {
    if let Some(&(_, switchpoint)) = history.iter().find(|(tli, _)| *tli == my_timeline) {
        return switchpoint >= my_end_lsn;
    }
    history.iter().all(|(tli, _)| *tli < my_timeline)
}

/// Like [`can_follow`] but with the target timeline known (`history` is the content of
/// `target_timeline`'s history file, empty for timeline 1): exact, no guessing.
pub fn can_follow_timeline(history: &[(u32, u64)], target_timeline: u32, my_timeline: u32, my_end_lsn: u64) -> bool {
    if my_timeline == target_timeline {
        return true;
    }
    history.iter().any(|&(tli, switchpoint)| tli == my_timeline && switchpoint >= my_end_lsn)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HISTORY_3: &str = "1\t0/3000148\tno recovery target specified\n\
                             \n\
                             # comment\n\
                             2\t0/5000000\tno recovery target specified\n\
                             garbage line\n";

    #[test]
    fn parse_history_skips_noise() {
        assert_eq!(parse_history(HISTORY_3), vec![(1, 0x3000148), (2, 0x5000000)]);
        assert_eq!(parse_history(""), vec![]);
    }

    #[test]
    fn can_follow_ancestor_before_switchpoint() {
        let h = parse_history(HISTORY_3);
        assert!(can_follow(&h, 1, 0x3000000));
        assert!(can_follow(&h, 1, 0x3000148), "ending exactly at the switchpoint is fine");
        assert!(!can_follow(&h, 1, 0x3000149), "WAL past the switchpoint diverged");
        assert!(can_follow(&h, 2, 0x4000000));
        assert!(!can_follow(&h, 2, 0x6000000));
    }

    #[test]
    fn can_follow_own_or_unknown_timeline() {
        let h = parse_history(HISTORY_3);
        assert!(can_follow(&h, 3, 0x9000000), "already on the newest timeline");
        assert!(can_follow(&[], 1, 0x9000000), "timeline 1 has no history");
        // An older timeline that is not an ancestor: diverged.
        let h = parse_history("1\t0/3000148\treason\n3\t0/5000000\treason\n");
        assert!(!can_follow(&h, 2, 0x1000000));
    }

    #[test]
    fn can_follow_with_known_target() {
        let h = parse_history(HISTORY_3);
        assert!(can_follow_timeline(&h, 3, 3, u64::MAX));
        assert!(can_follow_timeline(&h, 3, 1, 0x3000000));
        assert!(!can_follow_timeline(&h, 3, 1, 0x4000000));
        assert!(!can_follow_timeline(&h, 3, 4, 0x1000000), "sibling timeline");
    }
}
