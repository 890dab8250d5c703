//! Helpers for tests that run their own postgres servers (in this crate, the proxy's and the
//! backup tests): a temp dir the postgres OS user can enter, an [`Instance`] on a free port,
//! and a guard that stops the server when dropped, also when the test panics.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::binaries::PgBinaries;
use crate::control::Instance;
use crate::user::run_as_for;

/// A temp dir (named `<prefix>...`) made 0755: postgres runs as its own OS user when the tests
/// run as root, and must be able to traverse into it.
pub fn tempdir(prefix: &str) -> tempfile::TempDir {
    let tmp = tempfile::Builder::new().prefix(prefix).tempdir().expect("create a temp dir");
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod the temp dir");
    tmp
}

/// A TCP port that was free a moment ago, below the ephemeral range ([`free_ports`]): a port
/// from `bind(0)` could be taken as a source port by another test's connection before the
/// server binds it (CI, 2026-11-22: "could not bind IPv4 address: Address already in use").
///
/// [`free_ports`]: crate::ports::free_ports
pub fn free_port() -> u16 {
    crate::ports::free_ports(1).expect("bind a free port")[0]
}

/// An instance in `root/name` (data, log, socket directory) on a free port, run as the
/// `postgres` OS user when root.
pub fn instance(root: &Path, name: &str) -> Instance {
    let dir = root.join(name);
    Instance {
        bins: PgBinaries::discover(None).expect("PostgreSQL server binaries"),
        data_dir: dir.join("data"),
        run_as: run_as_for("postgres").expect("the postgres OS user"),
        log_file: dir.join("postgres.log"),
        socket_dir: dir.join("sock"),
        port: free_port(),
        superuser: "postgres".into(),
    }
}

/// Stops the server when dropped (also on panic, after printing the end of its log):
/// `pg_ctl stop -m immediate` as the postgres user, then SIGKILL to the postmaster if it is
/// still there.
pub struct StopOnDrop(pub Instance);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let inst = &self.0;
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&inst.log_file).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!(
                "--- last lines of {} ---\n{}",
                inst.log_file.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        if inst.postmaster_pid().is_none() {
            return;
        }
        let mut cmd = Command::new(inst.bins.path("pg_ctl"));
        cmd.args(["stop", "-m", "immediate", "-w", "-t", "10", "-D"]).arg(&inst.data_dir).current_dir("/");
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        if let Some(r) = &inst.run_as {
            cmd.uid(r.uid).gid(r.gid);
        }
        let _ = cmd.status();
        if let Some(pid) = inst.postmaster_pid() {
            // SAFETY: plain kill(2) on a pid read from postmaster.pid.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}
