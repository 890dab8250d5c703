//! Finding the PostgreSQL server programs and their major version.
//!
//! Lookup order: the configured `postgres.bin_dir`; `pg_config --bindir` (when `pg_config` is
//! on the PATH and that directory holds the server, which is not the case when only the
//! client package is installed); the newest `/usr/lib/postgresql/<major>/bin` (Debian/Ubuntu
//! layout).

use std::path::{Path, PathBuf};
use std::process::Command;

use tracing::debug;

use crate::PgError;

/// Programs every node needs. `pg_rewind` is used when present but is not required.
pub const REQUIRED: [&str; 6] = ["postgres", "initdb", "pg_ctl", "pg_basebackup", "pg_controldata", "pg_rewind"];

/// Oldest supported major version: the managed configuration uses `wal_keep_size` and
/// reloadable `primary_conninfo`, both new in PostgreSQL 13.
pub const MIN_MAJOR_VERSION: u32 = 13;

/// Where the PostgreSQL server programs live and which major version they are.
#[derive(Debug, Clone)]
pub struct PgBinaries {
    /// Directory holding `postgres`, `initdb`, `pg_ctl`, ...
    pub dir: PathBuf,
    /// Major version, e.g. `15`.
    pub major_version: u32,
}

impl PgBinaries {
    /// Finds the server programs (see the module doc for the order) and checks that all of
    /// [`REQUIRED`] exist and that the version is supported.
    ///
    /// An explicitly configured directory is used as is: if it is incomplete that is an
    /// error, not a reason to silently pick another installation.
    pub fn discover(configured: Option<&Path>) -> Result<PgBinaries, PgError> {
        let dir = match configured {
            Some(dir) => dir.to_path_buf(),
            None => match from_pg_config().or_else(newest_debian_bindir) {
                Some(dir) => dir,
                None => {
                    return Err(PgError::MissingBinaries {
                        problem: "no PostgreSQL server found: `pg_config --bindir` is unavailable or has no server \
                                  programs, and no /usr/lib/postgresql/*/bin/postgres exists"
                            .into(),
                    })
                }
            },
        };
        let missing: Vec<&str> = REQUIRED.iter().copied().filter(|p| !is_executable(&dir.join(p))).collect();
        if !missing.is_empty() {
            return Err(PgError::MissingBinaries {
                problem: format!("{} is missing in {}", missing.join(", "), dir.display()),
            });
        }
        let major_version = server_major_version(&dir.join("postgres"))?;
        if major_version < MIN_MAJOR_VERSION {
            return Err(PgError::MissingBinaries {
                problem: format!(
                    "{} is PostgreSQL {major_version}, but pgkeel needs {MIN_MAJOR_VERSION} or newer",
                    dir.display()
                ),
            });
        }
        debug!(dir = %dir.display(), major_version, "found PostgreSQL binaries");
        Ok(PgBinaries { dir, major_version })
    }

    /// Full path of one program, e.g. `path("pg_ctl")`.
    pub fn path(&self, prog: &str) -> PathBuf {
        self.dir.join(prog)
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

/// `pg_config --bindir`, if it names a directory with the server programs.
fn from_pg_config() -> Option<PathBuf> {
    let out = Command::new("pg_config").arg("--bindir").output().ok()?;
    if !out.status.success() {
        return None;
    }
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    ["postgres", "initdb", "pg_ctl"].iter().all(|p| is_executable(&dir.join(p))).then_some(dir)
}

/// The newest `/usr/lib/postgresql/<version>/bin` that contains `postgres`.
fn newest_debian_bindir() -> Option<PathBuf> {
    let entries = std::fs::read_dir("/usr/lib/postgresql").ok()?;
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let version = version_key(&name)?;
            let bin = e.path().join("bin");
            is_executable(&bin.join("postgres")).then_some((version, bin))
        })
        .max_by_key(|(v, _)| *v)
        .map(|(_, bin)| bin)
}

/// Sort key for directory names like `15` or `9.6`.
fn version_key(name: &str) -> Option<(u32, u32)> {
    let mut parts = name.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = match parts.next() {
        Some(m) => m.parse().ok()?,
        None => 0,
    };
    Some((major, minor))
}

/// Runs `postgres --version` (allowed as root) and returns the major version.
fn server_major_version(postgres: &Path) -> Result<u32, PgError> {
    let out = Command::new(postgres)
        .arg("--version")
        .output()
        .map_err(|e| PgError::io(format!("running {} --version", postgres.display()), e))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(PgError::CommandFailed {
            command: format!("{} --version", postgres.display()),
            status: out.status.to_string(),
            output: format!("{}{}", text, String::from_utf8_lossy(&out.stderr)),
        });
    }
    parse_version_output(&text).ok_or_else(|| PgError::Unexpected {
        source_name: format!("{} --version", postgres.display()),
        problem: format!("no version number in {:?}", text.trim()),
    })
}

/// Parses `postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)` → 15 (and `9.6.24` → 9).
pub(crate) fn parse_version_output(text: &str) -> Option<u32> {
    let rest = text.split_once(')').map(|(_, r)| r).unwrap_or(text);
    let word = rest.split_whitespace().next()?;
    let digits: String = word.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_parsing() {
        assert_eq!(parse_version_output("postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)\n"), Some(15));
        assert_eq!(parse_version_output("postgres (PostgreSQL) 17beta1"), Some(17));
        assert_eq!(parse_version_output("postgres (PostgreSQL) 9.6.24"), Some(9));
        assert_eq!(parse_version_output("garbage"), None);
        assert_eq!(version_key("9.6"), Some((9, 6)));
        assert_eq!(version_key("15"), Some((15, 0)));
        assert_eq!(version_key("x"), None);
    }

    #[test]
    fn configured_dir_missing_programs_is_explained() {
        let err = PgBinaries::discover(Some(Path::new("/nonexistent/pg/bin"))).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/pg/bin"), "{err}");
        assert!(err.contains("initdb"), "{err}");
        assert!(err.contains("apt-get install postgresql"), "{err}");
        assert!(err.contains("postgres.bin_dir"), "{err}");
    }
}
