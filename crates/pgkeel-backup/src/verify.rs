//! `backup verify`: re-read every stored file of a backup and check it against the manifest,
//! and check that the WAL the backup needs is in the archive and intact.

use std::io;

use anyhow::Context;

use crate::codec::decompress_stream;
use crate::manifest::{FileEntry, Manifest};
use crate::parallel;
use crate::repo::Repo;
use crate::walname::{SegmentName, WalFile};

/// The outcome of a verification.
#[derive(Debug, Clone)]
pub struct VerifyReport {
    /// The manifest checked.
    pub manifest: Manifest,
    /// Files checked.
    pub files_checked: usize,
    /// WAL segments checked.
    pub wal_checked: usize,
    /// One line per problem, each naming the file or segment; empty when all is well.
    pub problems: Vec<String>,
}

/// Verifies backup `label`. Returns a report (with problems listed) for a backup that
/// exists; `Err` only when the backup cannot be examined at all.
pub fn verify_backup(repo: &Repo, label: &str, jobs: usize) -> anyhow::Result<VerifyReport> {
    repo.check()?;
    let m = repo.read_manifest(label)?.with_context(|| {
        if repo.storage().exists(&repo.backup_prefix(label)).unwrap_or(false) {
            format!("backup {label} is incomplete (no manifest): it was interrupted and cannot be restored")
        } else {
            format!("no backup labelled {label:?}; `pgkeel backup list` shows the backups")
        }
    })?;
    let checks = parallel::try_for_each(&m.files, jobs.clamp(1, 16), |f| {
        Ok::<_, std::convert::Infallible>(check_file(repo, &m, f).err())
    })
    .unwrap_or_default();
    let mut problems: Vec<String> = checks.into_iter().flatten().collect();

    let mut wal_checked = 0;
    match m.required_segnos() {
        Err(e) => problems.push(e),
        Ok(segnos) => {
            for segno in segnos {
                wal_checked += 1;
                match repo.find_segment(segno, m.wal_segment_size, m.start_timeline) {
                    Ok(Some(seg)) => {
                        if let Err(e) = repo.check_wal(&WalFile::Segment(seg)) {
                            problems.push(format!("WAL {seg}: {e:#}"));
                        }
                    }
                    Ok(None) => problems.push(format!(
                        "WAL {}: not in the archive (needed from {} to {}); the backup cannot be restored",
                        SegmentName::from_segno(m.start_timeline, segno, m.wal_segment_size),
                        m.start_lsn,
                        m.stop_lsn
                    )),
                    Err(e) => problems.push(format!("WAL segment number {segno}: {e:#}")),
                }
            }
        }
    }
    Ok(VerifyReport { files_checked: m.files.len(), wal_checked, problems, manifest: m })
}

fn check_file(repo: &Repo, m: &Manifest, f: &FileEntry) -> Result<(), String> {
    let key = repo.backup_file_key(f.holder(m), &f.path);
    let mut src = match repo.storage().open(&key) {
        Ok(Some(r)) => r,
        Ok(None) => {
            return Err(format!(
                "file {}: missing from the repository ({key}{})",
                f.path,
                crate::restore::shared_note(m, f)
            ))
        }
        Err(e) => return Err(format!("file {}: {e}", f.path)),
    };
    let (size, sha) = decompress_stream(&mut src, &mut io::sink())
        .map_err(|e| format!("file {}: cannot be decompressed: {e} ({key})", f.path))?;
    if size != f.size || sha != f.sha256 {
        return Err(format!(
            "file {}: content differs from the manifest: {size} bytes with sha256 {sha}, expected {} bytes with \
             sha256 {} ({key})",
            f.path, f.size, f.sha256
        ));
    }
    Ok(())
}
