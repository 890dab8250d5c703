//! Fencing outside the agent process: the guard.
//!
//! A primary must stop accepting writes before its lease can expire for the other members,
//! also when its agent crashes (SIGKILL), hangs (SIGSTOP) or is stuck in a system call. The
//! agent cannot promise that about itself, so a separate, tiny process per node does:
//!
//! - the agent writes `NODE_DIR/guard.lease` after every successful acquire or renewal:
//!   `armed <fence_at> <term>`, where `fence_at` is a CLOCK_MONOTONIC time in ms (the clock is
//!   system-wide, so both processes read the same one) a little before the lease deadline;
//!   `disarmed` whenever it holds no lease; `exit` on a clean shutdown;
//! - the guard (`pgkeel guard`) polls that file (every 50 ms while armed); once an armed `fence_at` has
//!   passed without a newer one, it SIGKILLs postgres's whole process group, so no backend can
//!   acknowledge another commit, and logs the time with the term it fenced.
//!
//! The agent itself demotes earlier (at the lease deadline minus the demote margin); the guard
//! fires at half that margin, so in normal operation it never acts.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

/// Name of the file the agent writes and the guard reads.
pub const LEASE_FILE: &str = "guard.lease";
/// Name of the guard's pid file.
pub const PID_FILE: &str = "guard.pid";

/// CLOCK_MONOTONIC in ms: the same clock for every process on the machine.
pub fn monotonic_ms() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

/// What the agent tells the guard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Order {
    /// Fence at `fence_at_ms` (CLOCK_MONOTONIC) unless a newer order arrives.
    Armed {
        /// When to fence.
        fence_at_ms: u64,
        /// The lease's term (for the log).
        term: u64,
    },
    /// No lease: nothing to fence.
    Disarmed,
    /// The agent shut down cleanly: the guard exits.
    Exit,
}

impl Order {
    fn render(&self) -> String {
        match self {
            Order::Armed { fence_at_ms, term } => format!("armed {fence_at_ms} {term}\n"),
            Order::Disarmed => "disarmed\n".into(),
            Order::Exit => "exit\n".into(),
        }
    }

    fn parse(text: &str) -> Option<Order> {
        let mut f = text.split_whitespace();
        match f.next()? {
            "armed" => Some(Order::Armed { fence_at_ms: f.next()?.parse().ok()?, term: f.next()?.parse().ok()? }),
            "disarmed" => Some(Order::Disarmed),
            "exit" => Some(Order::Exit),
            _ => None,
        }
    }
}

/// The agent's side: keeps a guard running for this node and tells it what to fence.
pub(crate) struct GuardHandle {
    node_dir: PathBuf,
    data_dir: PathBuf,
    last: Option<Order>,
    /// The guard this agent started: it counts as running before it has written its pid file
    /// (two calls a few ms apart started two guards, and one then had to give way).
    child: Option<std::process::Child>,
}

impl GuardHandle {
    pub(crate) fn new(node_dir: &Path, data_dir: &Path) -> Self {
        GuardHandle { node_dir: node_dir.to_path_buf(), data_dir: data_dir.to_path_buf(), last: None, child: None }
    }

    fn guard_pid(&self) -> Option<i32> {
        let pid: i32 = std::fs::read_to_string(self.node_dir.join(PID_FILE)).ok()?.trim().parse().ok()?;
        pgkeel_pg::process::alive(pid).then_some(pid)
    }

    /// Start the guard unless one runs for this node. It lives in its own process group so it
    /// survives the agent and a Ctrl-C aimed at the agent's terminal.
    pub(crate) fn ensure_running(&mut self) -> anyhow::Result<()> {
        // `try_wait` also reaps a guard that exited, so it does not linger as a zombie.
        if let Some(child) = &mut self.child {
            if matches!(child.try_wait(), Ok(None)) {
                return Ok(());
            }
            self.child = None;
        }
        if self.guard_pid().is_some() {
            return Ok(());
        }
        let exe = std::env::current_exe().context("find the pgkeel executable")?;
        let log_path = self.node_dir.join("guard.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("open {}", log_path.display()))?;
        use std::os::unix::process::CommandExt;
        let child = std::process::Command::new(exe)
            .arg("guard")
            .arg("--node-dir")
            .arg(&self.node_dir)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .context("start the fencing guard")?;
        tracing::info!(pid = child.id(), "started the fencing guard");
        self.child = Some(child);
        Ok(())
    }

    /// Tell the guard; writes only when the order changed.
    pub(crate) fn tell(&mut self, order: Order) {
        if self.last.as_ref() == Some(&order) {
            return;
        }
        let path = self.node_dir.join(LEASE_FILE);
        let tmp = self.node_dir.join(format!("{LEASE_FILE}.tmp"));
        let result = std::fs::write(&tmp, order.render()).and_then(|_| std::fs::rename(&tmp, &path));
        match result {
            Ok(()) => self.last = Some(order),
            Err(e) => tracing::error!("failed to instruct the fencing guard ({}): {e}", path.display()),
        }
    }
}

/// Fence: SIGKILL the postmaster's process group (the postmaster leads its own group, pg_ctl
/// starts it in a new session), so every backend dies with it.
fn fence(data_dir: &Path) -> Option<i32> {
    let pid = pgkeel_pg::process::postmaster_pid(data_dir)?;
    // SAFETY: getpgid and kill have no memory-safety implications.
    unsafe {
        if libc::getpgid(pid) == pid {
            libc::kill(-pid, libc::SIGKILL);
        } else {
            libc::kill(pid, libc::SIGKILL);
        }
    }
    Some(pid)
}

fn log(msg: &str) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
    eprintln!("{now} guard: {msg}");
}

/// The guard process: `pgkeel guard --node-dir DIR --data-dir DIR`.
pub fn run(node_dir: &Path, data_dir: &Path) -> anyhow::Result<()> {
    let pid_file = node_dir.join(PID_FILE);
    std::fs::write(&pid_file, format!("{}\n", std::process::id()))
        .with_context(|| format!("write {}", pid_file.display()))?;
    log(&format!("watching {} for {}", node_dir.join(LEASE_FILE).display(), data_dir.display()));
    let lease = node_dir.join(LEASE_FILE);
    let mut fenced_at: Option<u64> = None;
    let me = std::process::id() as i32;
    loop {
        // A newer guard of this node (started by a restarted agent) has taken over: it writes
        // its own pid file, and two guards would only race. And once the node's directory and
        // its data directory are gone there is nothing left to guard.
        let owner: Option<i32> = std::fs::read_to_string(&pid_file).ok().and_then(|t| t.trim().parse().ok());
        if owner.is_some_and(|pid| pid != me && pgkeel_pg::process::alive(pid)) {
            log("another guard took over this node: exiting");
            return Ok(());
        }
        if !node_dir.exists() && !data_dir.exists() {
            log("the node and data directories are gone: exiting");
            return Ok(());
        }
        let order = std::fs::read_to_string(&lease).ok().and_then(|t| Order::parse(&t)).unwrap_or(Order::Disarmed);
        match order {
            Order::Exit => {
                log("agent shut down cleanly: exiting");
                let _ = std::fs::remove_file(&pid_file);
                return Ok(());
            }
            Order::Disarmed => fenced_at = None,
            Order::Armed { fence_at_ms, term } => {
                if monotonic_ms() >= fence_at_ms && fenced_at != Some(fence_at_ms) {
                    match fence(data_dir) {
                        Some(pid) => log(&format!(
                            "lease of term {term} not renewed in time: killed postgres (pid {pid}) and its backends"
                        )),
                        None => log(&format!("lease of term {term} not renewed in time; postgres is not running")),
                    }
                    fenced_at = Some(fence_at_ms);
                }
            }
        }
        // The fence time is at least a few hundred ms after any order is written, so 50 ms
        // polling while armed is ample; disarmed, a slower poll keeps the guard nearly free.
        let armed = fenced_at.is_none() && std::fs::read_to_string(&lease).is_ok_and(|t| t.starts_with("armed"));
        std::thread::sleep(Duration::from_millis(if armed { 50 } else { 200 }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_round_trip() {
        for o in [Order::Armed { fence_at_ms: 123, term: 4 }, Order::Disarmed, Order::Exit] {
            assert_eq!(Order::parse(&o.render()), Some(o));
        }
        assert_eq!(Order::parse("armed x 1"), None);
        assert_eq!(Order::parse(""), None);
    }

    #[test]
    fn monotonic_clock_moves() {
        let a = monotonic_ms();
        std::thread::sleep(Duration::from_millis(5));
        assert!(monotonic_ms() >= a + 5);
    }
}
