//! The repository: one directory or bucket prefix holding the WAL archive, the base backups
//! and the logical dumps ([`crate::dump`]) of one or more clusters.
//!
//! ```text
//! REPO/<cluster>/wal/history/00000002.history.zst
//! REPO/<cluster>/wal/0000000100000000/000000010000000000000003.zst
//! REPO/<cluster>/wal/0000000100000000/000000010000000000000003.partial.zst
//! REPO/<cluster>/wal/0000000100000000/000000010000000000000002.00000028.backup.zst
//! REPO/<cluster>/backups/<label>/data/<path in PGDATA>.zst
//! REPO/<cluster>/backups/<label>/manifest.json          (written last)
//! REPO/<cluster>/dumps/<label>/...                        (see crate::dump)
//! ```

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};

use crate::codec::{decode_archive, decode_header, encode_archive};
use crate::manifest::Manifest;
use crate::storage::{sync_dir, temp_file, LocalStorage, Storage, WriteMode, WriteOutcome};
use crate::walname::{SegmentName, WalFile};

/// A cluster's part of a repository.
#[derive(Clone)]
pub struct Repo {
    storage: Arc<dyn Storage>,
    cluster: String,
}

/// What `wal push` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushOutcome {
    /// Stored now.
    Stored,
    /// The archive already had this file with identical content: nothing to do.
    AlreadyArchived,
}

/// What `wal fetch` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchOutcome {
    /// Written to the destination, checksum verified.
    Restored,
    /// Not in the archive (postgres expects exit code 1 then).
    Missing,
}

/// A backup directory found in the repository.
#[derive(Debug, Clone)]
pub struct BackupEntry {
    /// Its label (directory name).
    pub label: String,
    /// The manifest, when the backup is complete.
    pub manifest: Option<Manifest>,
    /// Why the manifest is missing or unreadable.
    pub problem: Option<String>,
}

/// Checks a cluster name: letters, digits, `-`, `_`, `.`, at most 64 characters, not
/// starting with `.`.
pub fn check_cluster_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        bail!("bad cluster name {name:?}: use 1 to 64 letters, digits, '-', '_' or '.' (not starting with '.')");
    }
    Ok(())
}

/// Checks a backup label: letters, digits, `-`, `_`, `.` (no path separators).
pub fn check_label(label: &str) -> anyhow::Result<()> {
    let ok = !label.is_empty()
        && label.len() <= 100
        && !label.starts_with('.')
        && label.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        bail!("bad backup label {label:?}: `pgkeel backup list` shows the labels");
    }
    Ok(())
}

impl Repo {
    /// The repository in local directory `root`, cluster `cluster`.
    pub fn local(root: &Path, cluster: &str) -> anyhow::Result<Repo> {
        Repo::new(Arc::new(LocalStorage::new(root)), cluster)
    }

    /// The repository at `location`: an `s3://BUCKET/PREFIX` URL (see
    /// [`crate::s3::S3Config::from_url`]) or a directory.
    pub fn open(location: &str, cluster: &str) -> anyhow::Result<Repo> {
        Repo::open_with(location, cluster, &pgkeel_config::S3Settings::default())
    }

    /// [`Repo::open`], with S3 settings that take precedence over the environment.
    pub fn open_with(location: &str, cluster: &str, s3: &pgkeel_config::S3Settings) -> anyhow::Result<Repo> {
        if crate::s3::is_s3_url(location) {
            return Repo::new(Arc::new(crate::s3::S3Storage::from_url_with(location, s3)?), cluster);
        }
        if location.is_empty() {
            bail!("the repository location is empty: give a directory or s3://BUCKET/PREFIX");
        }
        let path = Path::new(location);
        Repo::local(&std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()), cluster)
    }

    /// The repository on `storage`, cluster `cluster`.
    pub fn new(storage: Arc<dyn Storage>, cluster: &str) -> anyhow::Result<Repo> {
        check_cluster_name(cluster)?;
        Ok(Repo { storage, cluster: cluster.to_string() })
    }

    /// The cluster name.
    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// The storage.
    pub fn storage(&self) -> &dyn Storage {
        self.storage.as_ref()
    }

    /// Where the repository is, for messages.
    pub fn describe(&self) -> String {
        format!("{} (cluster {})", self.storage.describe(), self.cluster)
    }

    /// Fails with an explanation when the repository root is not there.
    pub fn check(&self) -> anyhow::Result<()> {
        self.storage.check().map_err(anyhow::Error::from)
    }

    /// Key of an archived WAL file.
    pub fn wal_key(&self, f: &WalFile) -> String {
        format!("{}/wal/{}/{f}.zst", self.cluster, f.archive_dir())
    }

    /// Key prefix of one backup.
    pub fn backup_prefix(&self, label: &str) -> String {
        format!("{}/backups/{label}", self.cluster)
    }

    /// Key of a stored data file of a backup.
    pub fn backup_file_key(&self, label: &str, rel: &str) -> String {
        format!("{}/backups/{label}/data/{rel}.zst", self.cluster)
    }

    /// Key of a backup's manifest.
    pub fn manifest_key(&self, label: &str) -> String {
        format!("{}/backups/{label}/manifest.json", self.cluster)
    }

    /// Key prefix of one logical dump.
    pub fn dump_prefix(&self, label: &str) -> String {
        format!("{}/dumps/{label}", self.cluster)
    }

    /// Archives the file at `path` (what postgres passes as `%p`; its name must be a WAL
    /// segment, `.partial`, `.backup` or `.history` file name).
    ///
    /// Pushing a file the archive already holds with the same content succeeds; with
    /// different content it fails, naming both checksums, and the archived copy stays.
    pub fn push_wal(&self, path: &Path) -> anyhow::Result<PushOutcome> {
        self.check()?;
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("{} has no file name", path.display()))?;
        let file = WalFile::parse(name).with_context(|| {
            format!(
                "{name:?} is not a WAL file name (a 24-hex-digit segment, .partial, .backup or .history): \
                 archive_command must pass %p"
            )
        })?;
        let content = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let (header, object) = encode_archive(&content).context("compressing")?;
        let key = self.wal_key(&file);
        let outcome = self
            .storage
            .write(&key, &object, WriteMode::NoClobber)
            .with_context(|| format!("storing {name} in {}", self.describe()))?;
        if outcome == WriteOutcome::Written {
            return Ok(PushOutcome::Stored);
        }
        let existing = self
            .storage
            .read(&key)
            .with_context(|| format!("reading the archived {name}"))?
            .with_context(|| format!("{name} vanished from the archive while it was being compared"))?;
        let old = decode_header(&existing).map_err(|e| {
            anyhow::anyhow!(
                "{name} is already archived, but the archived copy is unreadable ({e}); it was left untouched. \
                 Check the repository {}",
                self.describe()
            )
        })?;
        if old == header {
            return Ok(PushOutcome::AlreadyArchived);
        }
        bail!(
            "{name} is already archived with different content: archived sha256 {} ({} bytes), this file sha256 {} \
             ({} bytes). The archived copy was left untouched. Two servers wrote the same WAL file name: is another \
             cluster archiving into {} under the same cluster name, or did a former primary keep running?",
            old.sha256,
            old.size,
            header.sha256,
            header.size,
            self.describe()
        )
    }

    /// Restores the archived file `name` (postgres' `%f`) to `dest` (`%p`): verified against
    /// its checksum, written to a temporary file next to `dest`, fsynced, renamed.
    ///
    /// A name that is not a WAL file name, or that is not archived, is [`FetchOutcome::Missing`].
    pub fn fetch_wal(&self, name: &str, dest: &Path) -> anyhow::Result<FetchOutcome> {
        self.check()?;
        let Some(file) = WalFile::parse(name) else { return Ok(FetchOutcome::Missing) };
        let key = self.wal_key(&file);
        let Some(object) = self.storage.read(&key).with_context(|| format!("reading {name} from the archive"))? else {
            return Ok(FetchOutcome::Missing);
        };
        let (_, content) = decode_archive(&object).map_err(|e| {
            anyhow::anyhow!(
                "archived {name} is corrupt: {e} (object {key} in {}). Recovery cannot go on past this file",
                self.storage.describe()
            )
        })?;
        write_local_atomic(dest, &content).with_context(|| format!("writing {name} to {}", dest.display()))?;
        Ok(FetchOutcome::Restored)
    }

    /// Checks an archived WAL file fully (decompress, size, checksum).
    pub fn check_wal(&self, file: &WalFile) -> anyhow::Result<()> {
        let key = self.wal_key(file);
        let object = self.storage.read(&key)?.with_context(|| format!("{file} is not in the archive"))?;
        decode_archive(&object).map_err(|e| anyhow::anyhow!("archived {file} is corrupt: {e} (object {key})"))?;
        Ok(())
    }

    /// The archived segment with number `segno` on timeline `min_timeline` or a later one
    /// (the newest such timeline), if any.
    pub fn find_segment(&self, segno: u64, seg_size: u64, min_timeline: u32) -> anyhow::Result<Option<SegmentName>> {
        let wal_prefix = format!("{}/wal", self.cluster);
        let mut timelines: Vec<u32> = self
            .storage
            .list(&wal_prefix)?
            .iter()
            .filter(|d| d.len() == 16)
            .filter_map(|d| u32::from_str_radix(&d[..8], 16).ok())
            .filter(|t| *t >= min_timeline)
            .collect();
        timelines.sort_unstable();
        timelines.dedup();
        for tli in timelines.into_iter().rev() {
            let seg = SegmentName::from_segno(tli, segno, seg_size);
            if self.storage.exists(&self.wal_key(&WalFile::Segment(seg)))? {
                return Ok(Some(seg));
            }
        }
        Ok(None)
    }

    /// Every backup directory, complete or not, sorted by label.
    pub fn list_backups(&self) -> anyhow::Result<Vec<BackupEntry>> {
        let prefix = format!("{}/backups", self.cluster);
        let mut out = Vec::new();
        for label in self.storage.list(&prefix)? {
            if check_label(&label).is_err() {
                continue;
            }
            let (manifest, problem) = match self.read_manifest(&label) {
                Ok(Some(m)) => (Some(m), None),
                Ok(None) => (None, Some("incomplete: no manifest (interrupted or still running)".to_string())),
                Err(e) => (None, Some(format!("{e:#}"))),
            };
            out.push(BackupEntry { label, manifest, problem });
        }
        Ok(out)
    }

    /// Claims a free label for a backup or dump starting at `now_us` (`YYYYMMDDTHHMMSSZ`,
    /// with `-2`, `-3`... when taken) by creating `<prefix>/label.claim` with no-clobber, so
    /// two runs starting in the same second (a scheduled job on one member, a manual one on
    /// another) never share a label. `prefix` gives the directory of a label.
    pub fn claim_label(&self, now_us: i64, prefix: impl Fn(&str) -> String) -> anyhow::Result<String> {
        let base = crate::timefmt::label_utc(now_us);
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let who = format!("{} pid {}\n", host.trim(), std::process::id());
        for n in 1..1000 {
            let label = if n == 1 { base.clone() } else { format!("{base}-{n}") };
            let key = format!("{}/label.claim", prefix(&label));
            if self.storage.write(&key, who.as_bytes(), WriteMode::NoClobber)? == WriteOutcome::Written {
                return Ok(label);
            }
        }
        bail!("no free label for {base}")
    }

    /// The complete backups (those with a readable manifest), oldest first by stop time.
    pub fn complete_backups(&self) -> anyhow::Result<Vec<Manifest>> {
        let mut v: Vec<Manifest> = self.list_backups()?.into_iter().filter_map(|b| b.manifest).collect();
        v.sort_by(|a, b| (a.stop_time_us, &a.label).cmp(&(b.stop_time_us, &b.label)));
        Ok(v)
    }

    /// A backup's manifest; `None` when there is none (incomplete or no such backup).
    pub fn read_manifest(&self, label: &str) -> anyhow::Result<Option<Manifest>> {
        check_label(label)?;
        let key = self.manifest_key(label);
        let Some(bytes) = self.storage.read(&key)? else { return Ok(None) };
        let m: Manifest = serde_json::from_slice(&bytes).with_context(|| format!("parsing {key}"))?;
        if m.label != label || m.cluster != self.cluster {
            bail!("{key} describes backup {:?} of cluster {:?}: it was moved or copied by hand", m.label, m.cluster);
        }
        Ok(Some(m))
    }
}

/// Writes `content` to `dest` atomically and durably (temp file in the same directory,
/// fsync, rename, fsync the directory).
pub(crate) fn write_local_atomic(dest: &Path, content: &[u8]) -> io::Result<()> {
    let dir: PathBuf = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let (tmp, mut f) = temp_file(&dir, &name)?;
    let result = (|| {
        f.write_all(content)?;
        f.sync_all()?;
        fs::rename(&tmp, dest)?;
        sync_dir(&dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    drop::<File>(f);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(dir: &Path, name: &str, fill: u8) -> PathBuf {
        let p = dir.join(name);
        fs::write(&p, vec![fill; 1 << 20]).unwrap();
        p
    }

    #[test]
    fn push_duplicate_same_content_is_ok_different_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let repo_dir = tmp.path().join("repo");
        fs::create_dir(&repo_dir).unwrap();
        let repo = Repo::local(&repo_dir, "c1").unwrap();
        let pg_wal = tmp.path().join("pg_wal");
        fs::create_dir(&pg_wal).unwrap();
        let name = "000000010000000000000003";
        let p = segment(&pg_wal, name, 7);
        assert_eq!(repo.push_wal(&p).unwrap(), PushOutcome::Stored);
        assert_eq!(repo.push_wal(&p).unwrap(), PushOutcome::AlreadyArchived);
        let key = repo.wal_key(&WalFile::parse(name).unwrap());
        assert_eq!(key, "c1/wal/0000000100000000/000000010000000000000003.zst");
        let before = repo.storage().read(&key).unwrap().unwrap();

        let other = segment(&pg_wal, name, 8);
        let err = format!("{:#}", repo.push_wal(&other).unwrap_err());
        assert!(err.contains(name) && err.contains("different content"), "{err}");
        assert!(err.contains(&crate::codec::sha256_hex(&vec![7u8; 1 << 20])), "names the archived checksum: {err}");
        assert!(err.contains(&crate::codec::sha256_hex(&vec![8u8; 1 << 20])), "names the new checksum: {err}");
        assert_eq!(repo.storage().read(&key).unwrap().unwrap(), before, "the archived copy is untouched");

        // Fetch gives back the original content, atomically at the destination.
        let dest = tmp.path().join("RECOVERYXLOG");
        assert_eq!(repo.fetch_wal(name, &dest).unwrap(), FetchOutcome::Restored);
        assert_eq!(fs::read(&dest).unwrap(), vec![7u8; 1 << 20]);
    }

    #[test]
    fn fetch_missing_and_corrupt() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = Repo::local(tmp.path(), "c1").unwrap();
        let dest = tmp.path().join("out");
        assert_eq!(repo.fetch_wal("000000010000000000000009", &dest).unwrap(), FetchOutcome::Missing);
        assert_eq!(repo.fetch_wal("00000002.history", &dest).unwrap(), FetchOutcome::Missing);
        assert_eq!(repo.fetch_wal("not-a-wal-name", &dest).unwrap(), FetchOutcome::Missing);
        assert!(!dest.exists());

        let h = tmp.path().join("00000002.history");
        fs::write(&h, "1\t0/3000000\tno recovery target specified\n").unwrap();
        repo.push_wal(&h).unwrap();
        let key = repo.wal_key(&WalFile::History(2));
        assert_eq!(key, "c1/wal/history/00000002.history.zst");
        let path = tmp.path().join(&key);
        let mut bytes = fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n - 5] ^= 0xff;
        fs::write(&path, &bytes).unwrap();
        let err = format!("{:#}", repo.fetch_wal("00000002.history", &dest).unwrap_err());
        assert!(err.contains("00000002.history") && err.contains("corrupt"), "{err}");
        assert!(!dest.exists(), "nothing written for a corrupt file");
        assert!(repo.check_wal(&WalFile::History(2)).is_err());
    }

    #[test]
    fn push_refuses_odd_names_and_missing_repo() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = Repo::local(tmp.path(), "c1").unwrap();
        let p = tmp.path().join("postmaster.pid");
        fs::write(&p, "x").unwrap();
        let err = format!("{:#}", repo.push_wal(&p).unwrap_err());
        assert!(err.contains("not a WAL file name"), "{err}");
        let gone = Repo::local(&tmp.path().join("nope"), "c1").unwrap();
        assert!(gone.push_wal(&p).is_err());
        assert!(gone.fetch_wal("00000002.history", &tmp.path().join("x")).is_err(), "a missing repo is not 'missing'");
        assert!(Repo::local(tmp.path(), "../x").is_err());
        assert!(Repo::local(tmp.path(), "").is_err());
    }

    #[test]
    fn labels_are_claimed_once() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repo::local(dir.path(), "c").unwrap();
        let t = 1_714_566_600_000_000;
        let a = repo.claim_label(t, |l| repo.backup_prefix(l)).unwrap();
        let b = repo.claim_label(t, |l| repo.backup_prefix(l)).unwrap();
        let d = repo.claim_label(t, |l| repo.dump_prefix(l)).unwrap();
        assert_eq!(a, "20240501T123000Z");
        assert_eq!(b, "20240501T123000Z-2", "the same second gets the next label");
        assert_eq!(d, a, "dumps have labels of their own");
        assert!(repo.list_backups().unwrap().iter().all(|e| e.manifest.is_none()), "claimed, not complete");
    }

    #[test]
    fn find_segment_on_later_timelines() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = Repo::local(tmp.path(), "c1").unwrap();
        let sz = 16 << 20;
        for name in ["000000010000000000000003", "000000020000000000000004", "000000020000000100000000"] {
            let p = tmp.path().join(name);
            fs::write(&p, name).unwrap();
            repo.push_wal(&p).unwrap();
        }
        let find = |segno, tli| repo.find_segment(segno, sz, tli).unwrap().map(|s| s.to_string());
        assert_eq!(find(3, 1).as_deref(), Some("000000010000000000000003"));
        assert_eq!(find(3, 2), None);
        assert_eq!(find(4, 1).as_deref(), Some("000000020000000000000004"));
        assert_eq!(find(256, 1).as_deref(), Some("000000020000000100000000"));
        assert_eq!(find(5, 1), None);
    }
}
