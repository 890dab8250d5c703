//! The OS user postgres runs as.
//!
//! PostgreSQL refuses to run as root. When the agent runs as root, every postgres program is
//! started as an unprivileged user (default `postgres`) that must own the data directory and
//! every file the agent writes into it. When the agent is not root, programs simply run as
//! the agent's own user and nothing is chowned.

use std::ffi::CString;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::PgError;

/// The unprivileged OS user that runs postgres programs (only used when the agent is root).
#[derive(Debug, Clone)]
pub struct RunAs {
    /// User name.
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
}

/// Returns `Some(user)` when this process runs as root (postgres must then run as
/// `os_user`), `None` otherwise.
///
/// Fails when root and `os_user` does not exist or is itself root.
pub fn run_as_for(os_user: &str) -> Result<Option<RunAs>, PgError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let run_as = lookup_user(os_user)?.ok_or_else(|| PgError::NoSuchUser { name: os_user.to_string() })?;
    if run_as.uid == 0 {
        return Err(PgError::BadUser {
            name: os_user.to_string(),
            problem: "it has uid 0, and PostgreSQL refuses to run as root; set postgres.os_user to an \
                      unprivileged user such as `postgres`"
                .into(),
        });
    }
    Ok(Some(run_as))
}

/// Looks a user up in the password database (`getpwnam_r`, thread safe).
pub fn lookup_user(name: &str) -> Result<Option<RunAs>, PgError> {
    let bad = |problem: String| PgError::BadUser { name: name.to_string(), problem };
    let cname = CString::new(name).map_err(|_| bad("the name contains a NUL byte".into()))?;
    // SAFETY: sysconf has no preconditions; -1 (no limit known) is handled below.
    let hint = unsafe { libc::sysconf(libc::_SC_GETPW_R_SIZE_MAX) };
    let mut buf_len = if hint > 0 { hint as usize } else { 16 * 1024 };
    loop {
        let mut buf = vec![0 as libc::c_char; buf_len];
        // SAFETY: an all-zero passwd (null pointers, zero ids) is a valid value to be overwritten.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the duration of the call and buf_len is the real
        // buffer size; on success `result` points to `pwd`, whose strings live in `buf`.
        let rc = unsafe { libc::getpwnam_r(cname.as_ptr(), &mut pwd, buf.as_mut_ptr(), buf_len, &mut result) };
        if rc == libc::ERANGE && buf_len < 1 << 20 {
            buf_len *= 2;
            continue;
        }
        if rc != 0 {
            return Err(bad(format!("looking it up failed: {}", io::Error::from_raw_os_error(rc))));
        }
        if result.is_null() {
            return Ok(None);
        }
        return Ok(Some(RunAs { name: name.to_string(), uid: pwd.pw_uid, gid: pwd.pw_gid }));
    }
}

/// Creates `path` (and missing parents, which keep the default mode and owner), sets its
/// mode, and chowns the directory itself to `run_as` when given.
pub fn prepare_dir(path: &Path, mode: u32, run_as: Option<&RunAs>) -> io::Result<()> {
    std::fs::create_dir_all(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    if let Some(r) = run_as {
        std::os::unix::fs::chown(path, Some(r.uid), Some(r.gid))?;
    }
    Ok(())
}

/// Chowns one file to `run_as` when given (files the agent writes into the data directory
/// must belong to the postgres user).
pub(crate) fn chown_opt(path: &Path, run_as: Option<&RunAs>) -> io::Result<()> {
    match run_as {
        Some(r) => std::os::unix::fs::chown(path, Some(r.uid), Some(r.gid)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_root_and_missing() {
        let root = lookup_user("root").unwrap().expect("root exists");
        assert_eq!(root.uid, 0);
        assert!(lookup_user("pgkeel-no-such-user-xyz").unwrap().is_none());
    }

    #[test]
    fn missing_user_error_explains_fix() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            assert!(run_as_for("pgkeel-no-such-user-xyz").unwrap().is_none());
            return;
        }
        let err = run_as_for("pgkeel-no-such-user-xyz").unwrap_err().to_string();
        assert!(err.contains("useradd --system"), "{err}");
        assert!(run_as_for("root").is_err());
    }

    #[test]
    fn prepare_dir_sets_mode() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("a/b");
        prepare_dir(&d, 0o700, None).unwrap();
        let mode = std::fs::metadata(&d).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }
}
