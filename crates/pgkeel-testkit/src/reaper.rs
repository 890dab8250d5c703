//! Cleanup when the test process is told to stop. A test that overruns its time is ended by
//! the test runner (nextest sends SIGTERM, then SIGKILL after a grace period; Ctrl-C sends
//! SIGINT) without unwinding, so no `Drop` runs. The processes a cluster's test started
//! itself die with it (same process group), but `pgkeel up` detaches the agents, postmasters,
//! guards and its proxy into sessions of their own, and network namespaces are kernel state:
//! both would outlive the test, as would the temp dir. So each [`crate::Cluster`] and
//! [`crate::netns::Net`] registers a cleanup here while it lives; the first SIGTERM or SIGINT
//! runs every registered cleanup, newest first, and then ends the process as the signal would
//! have (default action, raised again).

use std::os::raw::{c_int, c_void};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Mutex, Once, PoisonError};

type Cleanup = Box<dyn FnOnce() + Send>;

/// The live registrations, oldest first.
static LIVE: Mutex<Vec<(u64, Cleanup)>> = Mutex::new(Vec::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(0);
static INSTALL: Once = Once::new();
/// The write end of the pipe the signal handler writes the signal number to.
static PIPE: AtomicI32 = AtomicI32::new(-1);

/// A registered cleanup; dropping it unregisters it (the owner cleaned up itself).
#[must_use = "the cleanup is unregistered when this is dropped"]
#[derive(Debug)]
pub(crate) struct Registration(u64);

impl Drop for Registration {
    fn drop(&mut self) {
        LIVE.lock().unwrap_or_else(PoisonError::into_inner).retain(|(id, _)| *id != self.0);
    }
}

/// Runs `cleanup` if the process gets SIGTERM or SIGINT while the registration lives.
pub(crate) fn register(cleanup: impl FnOnce() + Send + 'static) -> Registration {
    INSTALL.call_once(install);
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    LIVE.lock().unwrap_or_else(PoisonError::into_inner).push((id, Box::new(cleanup)));
    Registration(id)
}

/// The signal handler: only async-signal-safe work, a write to the pipe.
extern "C" fn on_signal(sig: c_int) {
    let byte = sig as u8;
    // SAFETY: write(2) of one byte from a live stack variable; async-signal-safe.
    unsafe {
        libc::write(PIPE.load(Ordering::Relaxed), (&byte as *const u8).cast::<c_void>(), 1);
    }
}

/// A thread that waits on the pipe and runs the cleanups, and the handlers that feed it.
/// Without a pipe or a thread, nothing is installed (the signals keep their default action).
fn install() {
    let mut fds = [0 as c_int; 2];
    // SAFETY: pipe2 fills the two-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return;
    }
    let read_end = fds[0];
    PIPE.store(fds[1], Ordering::Relaxed);
    let spawned = std::thread::Builder::new().name("testkit-reaper".into()).spawn(move || {
        let mut byte = 0u8;
        loop {
            // SAFETY: read(2) into a live one-byte buffer.
            let n = unsafe { libc::read(read_end, (&mut byte as *mut u8).cast::<c_void>(), 1) };
            if n == 1 {
                break;
            }
            if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        let sig = c_int::from(byte);
        eprintln!("testkit: signal {sig}: stopping the test clusters and removing their networks");
        let live = std::mem::take(&mut *LIVE.lock().unwrap_or_else(PoisonError::into_inner));
        for (_, cleanup) in live.into_iter().rev() {
            cleanup();
        }
        // SAFETY: restoring the default action and raising the signal ends the process as
        // the signal would have.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            libc::raise(sig);
        }
    });
    if spawned.is_err() {
        return;
    }
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: installs a handler that only writes to a pipe.
        unsafe {
            libc::signal(sig, on_signal as extern "C" fn(c_int) as libc::sighandler_t);
        }
    }
}
