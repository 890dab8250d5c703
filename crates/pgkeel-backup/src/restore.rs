//! Restore and point-in-time recovery: choose a backup, unpack it into an empty directory,
//! and configure recovery so that the first start of postgres replays the archived WAL up
//! to the target and then promotes.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use pgkeel_pg::user::RunAs;

use crate::codec::decompress_stream;
use crate::manifest::{FileEntry, Manifest};
use crate::parallel;
use crate::progress::{Progress, ProgressWriter};
use crate::repo::Repo;
use crate::storage::sync_dir;
use crate::timefmt::format_utc;

/// Where recovery stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Replay everything in the archive.
    Latest,
    /// Stop after the last transaction that committed at or before this time
    /// (microseconds since the epoch).
    Time(i64),
    /// Stop at this LSN.
    Lsn(u64),
    /// Stop after this transaction id commits.
    Xid(u64),
    /// Stop at this named restore point (`pg_create_restore_point`).
    Name(String),
}

impl Target {
    /// The target given by at most one of a time (with a UTC offset), an LSN, a transaction
    /// id or a restore point name; none means [`Target::Latest`]. `names` are what the four
    /// are called where they came from, for errors (e.g. `--target-time`, or
    /// `backup.bootstrap_from.target_time`).
    pub fn from_options(
        names: [&str; 4],
        time: Option<&str>,
        lsn: Option<&str>,
        xid: Option<u64>,
        name: Option<&str>,
    ) -> anyhow::Result<Target> {
        let given = [time.is_some(), lsn.is_some(), xid.is_some(), name.is_some()].iter().filter(|g| **g).count();
        let [n_time, n_lsn, n_xid, n_name] = names;
        if given > 1 {
            bail!("give at most one of {n_time}, {n_lsn}, {n_xid} and {n_name}");
        }
        Ok(if let Some(t) = time {
            Target::Time(crate::timefmt::parse_timestamp(t).map_err(|e| anyhow::anyhow!("{n_time}: {e}"))?)
        } else if let Some(l) = lsn {
            Target::Lsn(
                pgkeel_pg::lsn::parse_lsn(l).with_context(|| format!("{n_lsn} = {l:?}: write it like 0/3000148"))?,
            )
        } else if let Some(x) = xid {
            Target::Xid(x)
        } else if let Some(n) = name {
            Target::Name(n.to_string())
        } else {
            Target::Latest
        })
    }

    /// The `recovery_target_*` setting, if any: `(name, value)`.
    pub fn setting(&self) -> Option<(&'static str, String)> {
        match self {
            Target::Latest => None,
            Target::Time(t) => Some(("recovery_target_time", format_utc(*t))),
            Target::Lsn(l) => Some(("recovery_target_lsn", pgkeel_pg::lsn::format_lsn(*l))),
            Target::Xid(x) => Some(("recovery_target_xid", x.to_string())),
            Target::Name(n) => Some(("recovery_target_name", n.clone())),
        }
    }

    /// Whether `backup` can reach this target: it must be consistent (stopped) before it.
    /// `Err` says why not. For a named restore point nothing can be checked.
    pub fn reachable_from(&self, m: &Manifest) -> Result<(), String> {
        match self {
            Target::Latest | Target::Name(_) => Ok(()),
            Target::Time(t) => {
                if m.stop_time_us < *t {
                    Ok(())
                } else {
                    Err(format!(
                        "backup {} ends at {}, not before the target time {}",
                        m.label,
                        format_utc(m.stop_time_us),
                        format_utc(*t)
                    ))
                }
            }
            Target::Lsn(l) => {
                let stop = m.stop_lsn_value()?;
                if stop <= *l {
                    Ok(())
                } else {
                    Err(format!(
                        "backup {} ends at LSN {}, after the target LSN {}",
                        m.label,
                        m.stop_lsn,
                        pgkeel_pg::lsn::format_lsn(*l)
                    ))
                }
            }
            Target::Xid(x) => {
                if m.start_xmin <= *x {
                    Ok(())
                } else {
                    Err(format!(
                        "backup {} started after transaction {x} had ended (its oldest running transaction was {})",
                        m.label, m.start_xmin
                    ))
                }
            }
        }
    }
}

/// Picks the backup to restore: the given label (checked against the target), else the
/// newest complete backup that can reach the target. `backups` is oldest first.
pub fn select_backup<'a>(
    backups: &'a [Manifest],
    label: Option<&str>,
    target: &Target,
) -> Result<&'a Manifest, String> {
    if let Some(label) = label {
        let m = backups
            .iter()
            .find(|m| m.label == label)
            .ok_or_else(|| format!("no complete backup labelled {label:?}; `pgkeel backup list` shows the backups"))?;
        target.reachable_from(m)?;
        return Ok(m);
    }
    if backups.is_empty() {
        return Err(
            "the repository has no complete backup of this cluster: take one with `pgkeel backup create`".into()
        );
    }
    let mut why = String::new();
    for m in backups.iter().rev() {
        match target.reachable_from(m) {
            Ok(()) => return Ok(m),
            Err(e) => why = e,
        }
    }
    Err(format!("no backup can reach the target: the oldest one cannot either ({why})"))
}

/// What to restore where.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// The new data directory: absent or empty.
    pub to: PathBuf,
    /// The backup to use (default: chosen by [`select_backup`]).
    pub label: Option<String>,
    /// Where recovery stops.
    pub target: Target,
    /// The `restore_command` to configure (see [`crate::restore_command`]).
    pub restore_command: String,
    /// Give every restored file to this user (when restoring as root for a postgres that
    /// runs as `postgres`).
    pub run_as: Option<RunAs>,
    /// Parallel threads.
    pub jobs: usize,
    /// Show progress while unpacking (a bar on a terminal, log lines otherwise).
    pub progress: bool,
    /// Append the recovery settings ([`recovery_settings`]) to `postgresql.auto.conf`. The
    /// agent, bootstrapping a cluster from a backup, sets them itself instead.
    pub configure_recovery: bool,
}

/// Restores a backup into `opts.to` and configures recovery. Returns the manifest of the
/// backup used. Postgres is not started: the caller (or the user) starts it.
pub fn restore(repo: &Repo, opts: &RestoreOptions) -> anyhow::Result<Manifest> {
    repo.check()?;
    let backups = repo.complete_backups()?;
    let m = select_backup(&backups, opts.label.as_deref(), &opts.target).map_err(anyhow::Error::msg)?.clone();
    let to = std::path::absolute(&opts.to).unwrap_or_else(|_| opts.to.clone());
    match fs::read_dir(&to) {
        Ok(mut e) => {
            if e.next().is_some() {
                bail!("{} is not empty: restore into a new or empty directory", to.display());
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // Missing parents get the default mode: the postgres OS user must traverse them.
            if let Some(parent) = to.parent() {
                fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
            }
            fs::DirBuilder::new().mode(0o700).create(&to).with_context(|| format!("creating {}", to.display()))?;
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", to.display())),
    }
    fs::set_permissions(&to, fs::Permissions::from_mode(0o700)).with_context(|| format!("chmod {}", to.display()))?;

    for d in &m.directories {
        let p = to.join(checked_rel(&d.path)?);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&p)
            .with_context(|| format!("creating {}", p.display()))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(d.mode & 0o7777 | 0o700))
            .with_context(|| format!("chmod {}", p.display()))?;
    }
    for f in &m.files {
        if let Some(parent) = to.join(checked_rel(&f.path)?).parent() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
    }
    let mut files: Vec<&FileEntry> = m.files.iter().collect();
    files.sort_by_key(|f| std::cmp::Reverse(f.size));
    let progress = Progress::new(format!("restore {}", m.label), m.total_size(), opts.progress);
    parallel::try_for_each(&files, opts.jobs.clamp(1, 16), |f| restore_file(repo, &m, &to, f, &progress))?;
    progress.finish();

    write_new(&to.join("backup_label"), m.backup_label.as_bytes())?;
    if !m.tablespace_map.is_empty() {
        write_new(&to.join("tablespace_map"), m.tablespace_map.as_bytes())?;
    }
    if opts.configure_recovery {
        append_recovery_settings(&to, &m, opts)?;
    }
    write_new(&to.join("recovery.signal"), b"")?;

    // Directories last: their entries are all there now.
    let mut dirs: Vec<PathBuf> = m.directories.iter().map(|d| to.join(&d.path)).collect();
    dirs.push(to.clone());
    for d in &dirs {
        sync_dir(d).with_context(|| format!("fsync {}", d.display()))?;
    }
    if let Some(r) = &opts.run_as {
        chown_tree(&to, r).with_context(|| format!("giving {} to user {}", to.display(), r.name))?;
    }
    Ok(m)
}

/// Refuses paths from a manifest that could escape the target directory.
fn checked_rel(rel: &str) -> anyhow::Result<&str> {
    crate::storage::check_key(rel).with_context(|| format!("manifest path {rel:?} is not a plain relative path"))?;
    Ok(rel)
}

fn restore_file(repo: &Repo, m: &Manifest, to: &Path, f: &FileEntry, progress: &Progress) -> anyhow::Result<()> {
    let key = repo.backup_file_key(f.holder(m), &f.path);
    let mut src = repo.storage().open(&key)?.with_context(|| {
        format!("backup {}: file {} is missing from the repository ({key}{})", m.label, f.path, shared_note(m, f))
    })?;
    let dest = to.join(checked_rel(&f.path)?);
    let mut out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&dest)
        .with_context(|| format!("creating {}", dest.display()))?;
    let (size, sha) = {
        let mut w = ProgressWriter::new(io::BufWriter::with_capacity(256 * 1024, &mut out), progress);
        let r = decompress_stream(&mut src, &mut w)
            .with_context(|| format!("backup {}: file {} is damaged ({key})", m.label, f.path))?;
        w.flush().with_context(|| format!("writing {}", dest.display()))?;
        r
    };
    if size != f.size || sha != f.sha256 {
        bail!(
            "backup {}: file {} is damaged: restored {size} bytes with sha256 {sha}, the manifest says {} bytes with \
             sha256 {} ({key})",
            m.label,
            f.path,
            f.size,
            f.sha256
        );
    }
    out.set_permissions(fs::Permissions::from_mode(f.mode & 0o777 | 0o600))?;
    out.sync_all().with_context(|| format!("fsync {}", dest.display()))?;
    Ok(())
}

/// For a file stored by an earlier backup: which one, to explain a missing object.
pub(crate) fn shared_note(m: &Manifest, f: &FileEntry) -> String {
    match &f.stored_in {
        Some(l) if *l != m.label => format!("; it is unchanged since backup {l}, which stores it"),
        _ => String::new(),
    }
}

fn write_new(path: &Path, content: &[u8]) -> anyhow::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(content).and_then(|_| f.sync_all()).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The recovery settings restore appends to `postgresql.auto.conf` (read after every other
/// configuration file, so they win).
pub fn recovery_settings(m: &Manifest, target: &Target, restore_command: &str) -> String {
    let mut s = format!(
        "\n# Added by `pgkeel restore` from backup {} ({}). Remove these lines once the server has been promoted.\n",
        m.label,
        format_utc(m.stop_time_us)
    );
    s.push_str(&format!("restore_command = {}\n", pgkeel_pg::quote::conf_value(restore_command)));
    s.push_str("recovery_target_timeline = 'latest'\n");
    // The copied configuration still archives into the source cluster's repository: once
    // promoted, this server's new timeline would land there and collide with the live
    // cluster's next one. Turn archiving on again when it becomes a cluster of its own.
    s.push_str("archive_mode = 'off'\n");
    if let Some((name, value)) = target.setting() {
        s.push_str(&format!("{name} = {}\n", pgkeel_pg::quote::conf_value(&value)));
        s.push_str("recovery_target_action = 'promote'\n");
    }
    s
}

fn append_recovery_settings(to: &Path, m: &Manifest, opts: &RestoreOptions) -> anyhow::Result<()> {
    let path = to.join("postgresql.auto.conf");
    let text = recovery_settings(m, &opts.target, &opts.restore_command);
    let mut f = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    f.write_all(text.as_bytes()).and_then(|_| f.sync_all()).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn chown_tree(path: &Path, r: &RunAs) -> io::Result<()> {
    std::os::unix::fs::lchown(path, Some(r.uid), Some(r.gid))?;
    if fs::symlink_metadata(path)?.is_dir() {
        for e in fs::read_dir(path)? {
            chown_tree(&e?.path(), r)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::sample;

    const T0: i64 = 1_714_566_600_000_000;

    fn backups() -> Vec<Manifest> {
        let mut a = sample("A", T0, "0/3000100");
        a.start_xmin = 700;
        let mut b = sample("B", T0 + 60_000_000, "0/5000100");
        b.start_xmin = 800;
        let mut c = sample("C", T0 + 120_000_000, "0/7000100");
        c.start_xmin = 900;
        vec![a, b, c]
    }

    #[test]
    fn select_by_target() {
        let bs = backups();
        let pick = |t: Target| select_backup(&bs, None, &t).map(|m| m.label.as_str());
        assert_eq!(pick(Target::Latest), Ok("C"));
        assert_eq!(pick(Target::Name("x".into())), Ok("C"));
        assert_eq!(pick(Target::Time(T0 + 90_000_000)), Ok("B"));
        assert_eq!(pick(Target::Time(T0 + 60_000_000)), Ok("A"), "a backup ending exactly at the target is not used");
        assert_eq!(pick(Target::Time(T0 + 60_000_001)), Ok("B"));
        assert_eq!(pick(Target::Time(T0 + 600_000_000)), Ok("C"));
        let err = pick(Target::Time(T0 - 1)).unwrap_err();
        assert!(err.contains("no backup can reach"), "{err}");
        assert_eq!(pick(Target::Lsn(0x6000000)), Ok("B"));
        assert_eq!(pick(Target::Lsn(0x5000100)), Ok("B"));
        assert!(pick(Target::Lsn(0x2000000)).is_err());
        assert_eq!(pick(Target::Xid(850)), Ok("B"));
        assert_eq!(pick(Target::Xid(10_000)), Ok("C"));
        assert!(pick(Target::Xid(5)).is_err());
        assert!(select_backup(&[], None, &Target::Latest).unwrap_err().contains("no complete backup"));
    }

    #[test]
    fn select_by_label() {
        let bs = backups();
        assert_eq!(select_backup(&bs, Some("A"), &Target::Latest).unwrap().label, "A");
        assert_eq!(select_backup(&bs, Some("A"), &Target::Time(T0 + 1)).unwrap().label, "A");
        let err = select_backup(&bs, Some("C"), &Target::Time(T0 + 1)).unwrap_err();
        assert!(err.contains("backup C ends at") && err.contains("not before the target time"), "{err}");
        assert!(select_backup(&bs, Some("Z"), &Target::Latest).unwrap_err().contains("no complete backup labelled"));
    }

    #[test]
    fn targets_from_options() {
        let names = ["--target-time", "--target-lsn", "--target-xid", "--target-name"];
        assert_eq!(Target::from_options(names, None, None, None, None).unwrap(), Target::Latest);
        assert_eq!(Target::from_options(names, None, Some("0/3000148"), None, None).unwrap(), Target::Lsn(0x3000148));
        assert_eq!(Target::from_options(names, None, None, Some(7), None).unwrap(), Target::Xid(7));
        let err = Target::from_options(names, None, Some("0/1"), Some(7), None).unwrap_err().to_string();
        assert!(err.contains("at most one of --target-time"), "{err}");
        let err = Target::from_options(names, None, Some("zz"), None, None).unwrap_err().to_string();
        assert!(err.contains("--target-lsn = \"zz\""), "{err}");
        assert!(Target::from_options(names, Some("yesterday"), None, None, None).is_err());
    }

    #[test]
    fn settings_text() {
        let m = sample("B", T0, "0/5000100");
        let s = recovery_settings(&m, &Target::Time(T0 + 500_000), "'/bin/pgkeel' wal fetch %f %p");
        assert!(s.contains("restore_command = '''/bin/pgkeel'' wal fetch %f %p'\n"), "{s}");
        assert!(s.contains("recovery_target_time = '2024-05-01 12:30:00.500000+00'\n"), "{s}");
        assert!(s.contains("recovery_target_action = 'promote'\n"));
        assert!(s.contains("recovery_target_timeline = 'latest'\n"));
        assert!(s.contains("archive_mode = 'off'\n"), "a restored copy never archives into the source's repository");
        let s = recovery_settings(&m, &Target::Latest, "x");
        assert!(!s.contains("recovery_target_action") && !s.contains("recovery_target_time ="), "{s}");
        let s = recovery_settings(&m, &Target::Name("it's".into()), "x");
        assert!(s.contains("recovery_target_name = 'it''s'"), "{s}");
        let s = recovery_settings(&m, &Target::Lsn(0x5000200), "x");
        assert!(s.contains("recovery_target_lsn = '0/5000200'"), "{s}");
    }
}
