//! Retention (`backup expire`) on a repository laid out by hand, on a local directory and on
//! S3 (moto): it removes what it should and nothing else.

use std::collections::BTreeSet;
use std::sync::Arc;

use pgkeel_backup::dump::{DumpFile, DumpManifest};
use pgkeel_backup::expire::{expire_backups, expire_dumps, Retention};
use pgkeel_backup::manifest::{BackupKind, FileEntry, Manifest, FORMAT};
use pgkeel_backup::s3::S3Storage;
use pgkeel_backup::storage::{LocalStorage, Storage, WriteMode};
use pgkeel_backup::testing::Moto;
use pgkeel_backup::timefmt::{label_utc, now_us};
use pgkeel_backup::Repo;

const C: &str = "c";
const D: i64 = 86_400 * 1_000_000;

fn manifest(label: &str, tli: u32, start_lsn: &str, stop_time_us: i64) -> Manifest {
    Manifest {
        format: FORMAT,
        label: label.into(),
        cluster: C.into(),
        system_identifier: "1".into(),
        server_version_num: 160000,
        from_standby: false,
        kind: BackupKind::Full,
        reference: None,
        source: None,
        pgkeel_version: "test".into(),
        start_time_us: stop_time_us - 1_000_000,
        stop_time_us,
        start_lsn: start_lsn.into(),
        stop_lsn: start_lsn.into(),
        start_timeline: tli,
        wal_segment_size: 16 << 20,
        start_xmin: 1,
        backup_label: String::new(),
        tablespace_map: String::new(),
        directories: Vec::new(),
        files: vec![FileEntry {
            path: "PG_VERSION".into(),
            size: 3,
            stored_size: 12,
            sha256: "x".into(),
            mode: 0o600,
            mtime_ns: None,
            stored_in: None,
        }],
    }
}

fn put(s: &dyn Storage, key: &str, data: &[u8]) {
    s.write(key, data, WriteMode::Overwrite).unwrap();
}

fn wal_key(name: &str) -> String {
    let dir = if name.ends_with(".history") { "history".to_string() } else { name[..16].to_string() };
    format!("{C}/wal/{dir}/{name}.zst")
}

fn keys(s: &dyn Storage) -> BTreeSet<String> {
    s.list_tree("").unwrap().into_iter().map(|o| o.key).collect()
}

/// Three complete backups (10, 5 and 1 day old; the last on timeline 2), a fresh incomplete
/// one, and WAL on two timelines.
fn lay_out(s: &dyn Storage) -> (String, String, String, String) {
    let now = now_us();
    let a = label_utc(now - 10 * D);
    let b = label_utc(now - 5 * D);
    let c = label_utc(now - D);
    let fresh = label_utc(now);
    for (label, tli, lsn, t) in
        [(&a, 1, "0/2000028", now - 10 * D), (&b, 1, "0/5000028", now - 5 * D), (&c, 2, "0/9000028", now - D)]
    {
        let m = manifest(label, tli, lsn, t);
        put(s, &format!("{C}/backups/{label}/data/PG_VERSION.zst"), b"data");
        put(s, &format!("{C}/backups/{label}/manifest.json"), &serde_json::to_vec(&m).unwrap());
    }
    put(s, &format!("{C}/backups/{fresh}/data/PG_VERSION.zst"), b"still running");
    for seg in 1..=0xA {
        put(s, &wal_key(&format!("0000000100000000{seg:08X}")), b"wal");
    }
    for seg in 8..=0xC {
        put(s, &wal_key(&format!("0000000200000000{seg:08X}")), b"wal");
    }
    put(s, &wal_key("000000010000000000000008.partial"), b"partial");
    put(s, &wal_key("000000010000000000000002.00000028.backup"), b"backup history");
    put(s, &wal_key("000000010000000000000005.00000028.backup"), b"backup history");
    put(s, &wal_key("00000002.history"), b"1\t0/8000000\tno recovery target specified\n");
    // Another cluster in the same repository is never touched.
    put(s, "other/wal/0000000100000000/000000010000000000000001.zst", b"other");
    put(s, "other/backups/20000101T000000Z/data/x.zst", b"other");
    (a, b, c, fresh)
}

fn removed_between(before: &BTreeSet<String>, after: &BTreeSet<String>) -> BTreeSet<String> {
    before.difference(after).cloned().collect()
}

fn scenario(storage: Arc<dyn Storage>) {
    let s = storage.as_ref();
    let repo = Repo::new(storage.clone(), C).unwrap();
    let (a, b, c, fresh) = lay_out(s);
    let start = keys(s);

    // A dry run reports and removes nothing.
    let keep2 = Retention { keep: Some(2), max_age_us: None };
    let r = expire_backups(&repo, &keep2, true).unwrap();
    assert_eq!(r.removed.iter().map(|x| x.label.as_str()).collect::<Vec<_>>(), [a.as_str()]);
    assert_eq!(r.wal_files, 5, "{r:?}");
    assert_eq!(keys(s), start, "dry run");

    // --keep 2: backup A goes, and the WAL before B's start segment (5) on every timeline.
    let r = expire_backups(&repo, &keep2, false).unwrap();
    assert_eq!(r.kept, [b.clone(), c.clone()]);
    assert_eq!(r.wal_kept_from.as_deref(), Some("000000010000000000000005"));
    let after = keys(s);
    let mut expected: BTreeSet<String> = ["1", "2", "3", "4"]
        .iter()
        .map(|n| wal_key(&format!("00000001000000000000000{n}")))
        .chain([wal_key("000000010000000000000002.00000028.backup")])
        .chain([format!("{C}/backups/{a}/data/PG_VERSION.zst"), format!("{C}/backups/{a}/manifest.json")])
        .collect();
    assert_eq!(removed_between(&start, &after), expected);
    assert!(after.contains(&format!("{C}/backups/{fresh}/data/PG_VERSION.zst")), "a running backup stays");

    // A 2-day window keeps C (1 day old) and B (the newest before the window): no change.
    let r = expire_backups(&repo, &Retention { keep: None, max_age_us: Some(2 * D) }, false).unwrap();
    assert!(r.removed.is_empty() && r.wal_files == 0, "{r:?}");
    assert_eq!(keys(s), after);

    // --keep 1: B goes, and WAL before C's start (segment 9): timeline 1 up to 8 with the
    // .partial, timeline 2's segment 8. The history file stays.
    let r = expire_backups(&repo, &Retention { keep: Some(1), max_age_us: None }, false).unwrap();
    assert_eq!(r.kept, std::slice::from_ref(&c));
    let last = keys(s);
    expected = ["5", "6", "7", "8"]
        .iter()
        .map(|n| wal_key(&format!("00000001000000000000000{n}")))
        .chain([
            wal_key("000000010000000000000008.partial"),
            wal_key("000000010000000000000005.00000028.backup"),
            wal_key("000000020000000000000008"),
        ])
        .chain([format!("{C}/backups/{b}/data/PG_VERSION.zst"), format!("{C}/backups/{b}/manifest.json")])
        .collect();
    assert_eq!(removed_between(&after, &last), expected);
    assert!(last.contains(&wal_key("00000002.history")));
    assert!(last.contains(&wal_key("000000010000000000000009")) && last.contains(&wal_key("00000002000000000000000C")));
    assert!(last.iter().filter(|k| k.starts_with("other/")).count() == 2, "other clusters untouched");

    // The newest backup is never removed, and rules are required.
    let r = expire_backups(&repo, &Retention { keep: None, max_age_us: Some(1_000_000) }, false).unwrap();
    assert_eq!(r.kept, std::slice::from_ref(&c));
    assert!(expire_backups(&repo, &Retention::default(), false).is_err());
    assert!(repo.read_manifest(&c).unwrap().is_some());
}

fn dumps_scenario(storage: Arc<dyn Storage>) {
    let s = storage.as_ref();
    let repo = Repo::new(storage.clone(), C).unwrap();
    let now = now_us();
    let labels: Vec<String> = [3, 2, 1].iter().map(|d| label_utc(now - d * D)).collect();
    for (i, label) in labels.iter().enumerate() {
        let f = DumpFile { database: "app".into(), file: "db-app.dump".into(), size: 4, sha256: "x".into() };
        let m = DumpManifest {
            format: 1,
            label: label.clone(),
            cluster: C.into(),
            server_version_num: 160000,
            pg_dump_version: "test".into(),
            start_time_us: now - (3 - i as i64) * D,
            stop_time_us: now - (3 - i as i64) * D + 1,
            globals: DumpFile { database: String::new(), file: "globals.sql".into(), size: 1, sha256: "y".into() },
            databases: vec![f],
        };
        put(s, &format!("{C}/dumps/{label}/db-app.dump"), b"dump");
        put(s, &format!("{C}/dumps/{label}/globals.sql"), b"g");
        put(s, &format!("{C}/dumps/{label}/manifest.json"), &serde_json::to_vec(&m).unwrap());
    }
    put(s, &format!("{C}/wal/0000000100000000/000000010000000000000001.zst"), b"wal");
    let before = keys(s);
    let r = expire_dumps(&repo, &Retention { keep: Some(2), max_age_us: None }, false).unwrap();
    assert_eq!(r.kept, labels[1..]);
    let gone = removed_between(&before, &keys(s));
    assert_eq!(gone.len(), 3, "{gone:?}");
    assert!(gone.iter().all(|k| k.starts_with(&format!("{C}/dumps/{}/", labels[0]))), "{gone:?}");
}

#[test]
fn expire_on_a_local_repository() {
    let tmp = tempfile::tempdir().unwrap();
    scenario(Arc::new(LocalStorage::new(tmp.path())));

    // An incomplete backup untouched for over an hour is removed; a damaged manifest is not.
    let s = Arc::new(LocalStorage::new(tmp.path()));
    let repo = Repo::new(s.clone(), C).unwrap();
    let stale = "20000101T000000Z";
    put(s.as_ref(), &format!("{C}/backups/{stale}/data/PG_VERSION.zst"), b"x");
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
    let path = tmp.path().join(format!("{C}/backups/{stale}/data/PG_VERSION.zst"));
    std::fs::File::options().write(true).open(&path).unwrap().set_modified(old).unwrap();
    put(s.as_ref(), &format!("{C}/backups/20000102T000000Z/manifest.json"), b"{not json");
    let r = expire_backups(&repo, &Retention { keep: Some(5), max_age_us: None }, false).unwrap();
    assert_eq!(r.removed.len(), 1, "{r:?}");
    assert_eq!(r.removed[0].label, stale);
    assert!(!tmp.path().join(format!("{C}/backups/{stale}")).exists(), "the directory goes too");
    assert!(tmp.path().join(format!("{C}/backups/20000102T000000Z/manifest.json")).exists());

    let tmp = tempfile::tempdir().unwrap();
    dumps_scenario(Arc::new(LocalStorage::new(tmp.path())));
}

#[test]
fn expire_on_s3() {
    let m = Moto::start().unwrap_or_else(|e| panic!("{e}"));
    let s = S3Storage::new(m.config("pgkeel-expire", "repo")).unwrap();
    s.create_bucket().unwrap();
    scenario(Arc::new(s));
    let s = S3Storage::new(m.config("pgkeel-expire", "dumps")).unwrap();
    dumps_scenario(Arc::new(s));
}
