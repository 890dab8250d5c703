//! Process liveness as Linux reports it. A zombie has exited even though `kill(pid, 0)`
//! still succeeds; this container's PID 1 reaps orphans slowly, so the difference matters.

use std::path::Path;

/// `(comm, state)` of a process from `/proc/<pid>/stat`.
fn stat(pid: i32) -> Option<(String, char)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ...`; comm may itself contain spaces and parentheses.
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    let state = stat[close + 1..].trim_start().chars().next()?;
    Some((stat[open + 1..close].to_string(), state))
}

/// Whether `pid` exists (`kill(pid, 0)` succeeds or fails with EPERM) and is not a zombie.
pub fn alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 only checks for existence and permission.
    if unsafe { libc::kill(pid, 0) } != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EPERM) {
        return false;
    }
    !matches!(stat(pid), Some((_, 'Z' | 'X')))
}

/// The postmaster of `data_dir` from its `postmaster.pid`, if that process is alive and is a
/// postgres program (a pid reused after a crash counts as not running).
pub fn postmaster_pid(data_dir: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    let pid: i32 = text.lines().next()?.trim().parse().ok()?;
    if !alive(pid) {
        return None;
    }
    match stat(pid) {
        Some((comm, _)) if !comm.contains("postgres") && !comm.contains("postmaster") => {
            tracing::debug!(pid, comm, "postmaster.pid names a process that is not postgres");
            None
        }
        _ => Some(pid),
    }
}
