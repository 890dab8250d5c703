//! Backups for pgkeel: a repository on a local path or an S3-compatible bucket ([`repo`], on
//! the [`storage::Storage`] trait: [`storage::LocalStorage`], [`s3::S3Storage`]), the
//! continuous WAL archive (`archive_command`/`restore_command`: [`Repo::push_wal`],
//! [`Repo::fetch_wal`]), base backups with the non-exclusive low-level API ([`backup`]),
//! verification ([`verify`]), point-in-time restore ([`mod@restore`]), retention ([`expire`]),
//! logical dumps ([`dump`]) and progress output ([`progress`]).
//!
//! See `docs/backups.md` for the commands, the repository layout and the guarantees.

#![warn(missing_docs)]

pub mod backup;
pub mod codec;
pub mod dump;
pub mod expire;
pub mod manifest;
mod parallel;
pub mod progress;
pub mod repo;
pub mod restore;
pub mod s3;
pub mod sigv4;
pub mod storage;
#[doc(hidden)]
pub mod testing;
pub mod timefmt;
pub mod verify;
pub mod walname;

use std::path::Path;

pub use backup::{create_backup, BackupOptions, ConnectOptions};
pub use manifest::Manifest;
pub use repo::{FetchOutcome, PushOutcome, Repo};
pub use restore::{restore, select_backup, RestoreOptions, Target};
pub use verify::{verify_backup, VerifyReport};

/// Exit code of `wal fetch` for a file that is not in the archive: postgres then treats the
/// file as absent (end of the archive) and carries on.
pub const EXIT_FETCH_MISSING: u8 = 1;

/// Exit code of `wal fetch` for a file that is in the archive but cannot be delivered
/// (corrupt, unreadable repository, I/O error). PostgreSQL aborts recovery when
/// restore_command exits with a code above 125; anything lower would be read as "no such
/// file", and recovery would end early at that point, silently short of the target (or, with
/// no target, promote without the rest of the WAL).
pub const EXIT_FETCH_ABORT: u8 = 200;

/// Quotes a word for `sh` (postgres runs archive_command and restore_command with
/// `/bin/sh -c`): single quotes, with `'` written as `'\''`. Words made only of safe
/// characters are left bare.
pub fn shell_quote(word: &str) -> String {
    let safe = !word.is_empty() && word.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:@+,".contains(c));
    if safe {
        return word.to_string();
    }
    format!("'{}'", word.replace('\'', "'\\''"))
}

/// `EXE wal VERB --repo REPO --cluster CLUSTER [--s3-config FILE]`, shell-quoted, with `%`
/// doubled (postgres reads `%p`, `%f` and `%%` in these commands).
fn command_prefix(verb: &str, exe: &Path, repo: &Path, cluster: &str, s3_config: Option<&Path>) -> String {
    let mut cmd = format!(
        "{} wal {verb} --repo {} --cluster {}",
        shell_quote(&exe.to_string_lossy()),
        shell_quote(&repo.to_string_lossy()),
        shell_quote(cluster)
    );
    if let Some(f) = s3_config {
        cmd.push_str(&format!(" --s3-config {}", shell_quote(&f.to_string_lossy())));
    }
    cmd.replace('%', "%%")
}

/// The `archive_command` value (a shell command, not yet quoted for postgresql.conf) that
/// archives into the repository at `repo` under `cluster` with the pgkeel binary `exe`:
/// `EXE wal push --repo REPO --cluster CLUSTER %p`.
///
/// The agent sets `archive_mode = on` and `archive_command = archive_command(...)` (postgres
/// runs it as its own OS user, so `exe` must be executable and `repo` writable by that user).
pub fn archive_command(exe: &Path, repo: &Path, cluster: &str) -> String {
    archive_command_with(exe, repo, cluster, None)
}

/// [`archive_command`] for an S3 repository whose settings are in the file `s3_config`
/// (the keys of node.toml's `[backup.s3]`, readable by the postgres OS user only).
pub fn archive_command_with(exe: &Path, repo: &Path, cluster: &str, s3_config: Option<&Path>) -> String {
    command_prefix("push", exe, repo, cluster, s3_config) + " %p"
}

/// The `restore_command` value matching [`archive_command`]:
/// `EXE wal fetch --repo REPO --cluster CLUSTER %f %p`.
pub fn restore_command(exe: &Path, repo: &Path, cluster: &str) -> String {
    restore_command_with(exe, repo, cluster, None)
}

/// The `restore_command` value matching [`archive_command_with`].
pub fn restore_command_with(exe: &Path, repo: &Path, cluster: &str, s3_config: Option<&Path>) -> String {
    command_prefix("fetch", exe, repo, cluster, s3_config) + " %f %p"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_shell_quoted() {
        assert_eq!(
            archive_command(Path::new("/usr/bin/pgkeel"), Path::new("/var/lib/pgkeel/repo"), "main"),
            "/usr/bin/pgkeel wal push --repo /var/lib/pgkeel/repo --cluster main %p"
        );
        assert_eq!(
            restore_command(Path::new("/opt/my bin/pgkeel"), Path::new("/r/it's"), "c-1"),
            "'/opt/my bin/pgkeel' wal fetch --repo '/r/it'\\''s' --cluster c-1 %f %p"
        );
        assert_eq!(
            archive_command(Path::new("/x/pgkeel"), Path::new("/r/100%"), "c"),
            "/x/pgkeel wal push --repo '/r/100%%' --cluster c %p"
        );
        assert_eq!(
            archive_command_with(Path::new("/x/pgkeel"), Path::new("s3://b/p"), "c", Some(Path::new("/n/run/s3.toml"))),
            "/x/pgkeel wal push --repo s3://b/p --cluster c --s3-config /n/run/s3.toml %p"
        );
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a;b"), "'a;b'");
        assert_eq!(shell_quote("$HOME"), "'$HOME'");
    }

    #[test]
    fn abort_code_makes_postgres_stop_recovery() {
        // PostgreSQL treats exit codes > 125 from restore_command like a signal: FATAL.
        const { assert!(EXIT_FETCH_ABORT > 125) };
        assert_eq!(EXIT_FETCH_MISSING, 1);
    }
}
