//! The embedded single-host store used by `pgkeel up`.
//!
//! This module owns [`LocalStore`]: a [`Dcs`] kept in one JSON file that several agent
//! processes on the same machine share through a directory:
//!
//! - `store.lock`: an empty file; every write holds an exclusive `flock` on it for the whole
//!   read-modify-write, which serialises writers across processes and within one;
//! - `store.json`: the whole store (`revision`, `machine_id`, `keys`). It is only ever replaced
//!   by writing `store.json.tmp`, fsyncing it and renaming it over `store.json`, so a reader
//!   always sees one complete version of the file. Reads therefore take no lock: each sees
//!   the state after some completed write (the rename is a write's commit point), which keeps
//!   them linearizable without waiting behind a writer's fsync.
//!
//! TTLs are wall-clock deadlines (unix ms), because the processes sharing the store have no
//! common monotonic clock. An expired key is absent for every operation and is dropped from
//! the file by the next write.
//!
//! `watch` sleeps on inotify events for the directory (falling back to polling the data
//! file's metadata every 25 ms), re-parses the file only when it was replaced, and wakes
//! exactly when the watched key's TTL runs out.
//!
//! The store refuses to be shared between machines: `flock` and rename atomicity only hold on
//! a local filesystem, and two machines each running "the" local store would each elect a
//! leader. The creating machine's identity is recorded in the file and checked on every read,
//! and network filesystems are rejected when the store is opened.

use std::collections::BTreeMap;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::{Dcs, DcsError, DcsResult, KeyValue};

/// Name of the lock file inside the store directory.
const LOCK_FILE: &str = "store.lock";
/// Name of the data file inside the store directory.
const DATA_FILE: &str = "store.json";
/// Name of the temporary file a write renames over [`DATA_FILE`].
const TMP_FILE: &str = "store.json.tmp";

/// How often `watch` looks at the data file's metadata when it cannot be notified of changes
/// (inotify unavailable). Each look is one `stat`, but each wake-up of the sleeping thread
/// costs tens of microseconds on a VM: about 0.2-0.4% of a core per watcher at this rate.
const WATCH_POLL: Duration = Duration::from_millis(25);
/// How often `watch` looks at the data file's metadata when inotify tells it about changes:
/// only a safety net (and the moment a dropped watch notices it was cancelled).
const WATCH_NOTIFIED_RECHECK: Duration = Duration::from_millis(250);
/// How often `watch` re-reads the data file even when its metadata looks unchanged. Writers
/// give every version a distinct mtime, but a filesystem that stores mtimes with coarse
/// precision (e.g. ext4 with 128-byte inodes: whole seconds) may round two versions to the
/// same stamp; this bounds how long such a collision can hide a change.
const WATCH_FORCED_REREAD: Duration = Duration::from_secs(1);

/// Filesystem magic numbers (`statfs.f_type`) of network filesystems, on which neither
/// `flock` nor rename atomicity can be trusted across machines.
const NETWORK_FILESYSTEMS: &[(u32, &str)] =
    &[(0x6969, "NFS"), (0x517B, "SMB"), (0xFF53_4D42, "CIFS"), (0xFE53_4D42, "SMB2")];

/// The embedded single-host DCS: one JSON file in a directory shared by the agent processes
/// of one machine. See the [module documentation](self) for the design.
///
/// Cloning is cheap and clones share one lock-file handle and one watch cache.
#[derive(Clone)]
pub struct LocalStore {
    inner: Arc<Inner>,
}

/// State shared by the clones of one [`LocalStore`] and the blocking tasks it spawns.
struct Inner {
    dir: PathBuf,
    data_path: PathBuf,
    tmp_path: PathBuf,
    /// Identity of this machine, compared with the one recorded in the store.
    machine_id: String,
    /// The open lock file. The mutex is needed because `flock` locks belong to the open file
    /// description: two threads locking the same descriptor would both "get" the lock.
    lock_file: Mutex<File>,
    /// Last parsed version of the data file, used only by `watch`.
    watch_cache: Mutex<Option<Cached>>,
}

/// A parsed version of the data file and the metadata that identifies it.
struct Cached {
    stamp: Stamp,
    data: Arc<Data>,
}

/// Identifies one version of the data file: every write creates a new file (new inode or at
/// least a new, strictly later mtime), so an equal stamp means an unchanged file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    mtime_sec: i64,
    mtime_nsec: i64,
    size: u64,
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Stamp {
        Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            mtime_sec: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
            size: meta.size(),
        }
    }
}

/// The whole store, as kept in `store.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Data {
    /// Revision of the last successful write (0 for a fresh store).
    revision: u64,
    /// Identity of the machine that created the store.
    machine_id: String,
    /// Every key, including expired ones not yet purged.
    keys: BTreeMap<String, Entry>,
}

/// One key in memory.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(try_from = "DiskEntry", into = "DiskEntry")]
struct Entry {
    value: Vec<u8>,
    create_revision: u64,
    mod_revision: u64,
    expires_at_ms: Option<u64>,
}

/// One key as written to `store.json`. Values are stored as a JSON string so the file stays
/// readable for operators (pgkeel only writes UTF-8 JSON); bytes that are not UTF-8 are
/// stored hex-encoded with `hex: true`.
#[derive(Serialize, Deserialize)]
struct DiskEntry {
    value: String,
    #[serde(default, skip_serializing_if = "is_false")]
    hex: bool,
    create_revision: u64,
    mod_revision: u64,
    #[serde(default)]
    expires_at_ms: Option<u64>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl From<Entry> for DiskEntry {
    fn from(e: Entry) -> DiskEntry {
        let (value, hex) = match String::from_utf8(e.value) {
            Ok(s) => (s, false),
            Err(err) => (hex_encode(err.as_bytes()), true),
        };
        DiskEntry {
            value,
            hex,
            create_revision: e.create_revision,
            mod_revision: e.mod_revision,
            expires_at_ms: e.expires_at_ms,
        }
    }
}

impl TryFrom<DiskEntry> for Entry {
    type Error = String;

    fn try_from(d: DiskEntry) -> Result<Entry, String> {
        let value = if d.hex { hex_decode(&d.value)? } else { d.value.into_bytes() };
        Ok(Entry {
            value,
            create_revision: d.create_revision,
            mod_revision: d.mod_revision,
            expires_at_ms: d.expires_at_ms,
        })
    }
}

fn hex_encode(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

fn hex_decode(s: &str) -> Result<Vec<u8>, String> {
    fn nibble(c: u8) -> Result<u8, String> {
        match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'a'..=b'f' => Ok(c - b'a' + 10),
            b'A'..=b'F' => Ok(c - b'A' + 10),
            _ => Err(format!("invalid hex digit {:?} in a hex-encoded value", char::from(c))),
        }
    }
    if !s.len().is_multiple_of(2) {
        return Err("hex-encoded value has an odd number of digits".to_string());
    }
    s.as_bytes().chunks_exact(2).map(|p| Ok((nibble(p[0])? << 4) | nibble(p[1])?)).collect()
}

impl Entry {
    /// Expired entries are treated as absent everywhere.
    fn live_at(&self, now_ms: u64) -> bool {
        self.expires_at_ms.is_none_or(|e| e > now_ms)
    }

    fn key_value(&self, key: &str, now_ms: u64) -> KeyValue {
        KeyValue {
            key: key.to_string(),
            value: self.value.clone(),
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
            ttl_left: self.expires_at_ms.map(|e| Duration::from_millis(e.saturating_sub(now_ms))),
        }
    }
}

impl Data {
    /// The live entry of `key` at `now_ms`.
    fn live(&self, key: &str, now_ms: u64) -> Option<&Entry> {
        self.keys.get(key).filter(|e| e.live_at(now_ms))
    }

    fn get(&self, key: &str, now_ms: u64) -> Option<KeyValue> {
        self.live(key, now_ms).map(|e| e.key_value(key, now_ms))
    }

    /// Write `key` as the next revision, keeping its create revision if it is live.
    fn write(&mut self, key: &str, value: &[u8], ttl: Option<Duration>, now_ms: u64) -> u64 {
        self.revision += 1;
        let revision = self.revision;
        let create_revision = self.live(key, now_ms).map_or(revision, |e| e.create_revision);
        let expires_at_ms = ttl.map(|t| now_ms.saturating_add(ttl_ms(t)));
        self.keys.insert(
            key.to_string(),
            Entry { value: value.to_vec(), create_revision, mod_revision: revision, expires_at_ms },
        );
        revision
    }
}

/// A TTL in whole milliseconds, rounded up so a key never lives shorter than asked.
fn ttl_ms(ttl: Duration) -> u64 {
    let ms = ttl.as_millis() + u128::from(!ttl.subsec_nanos().is_multiple_of(1_000_000));
    u64::try_from(ms).unwrap_or(u64::MAX)
}

/// Wall-clock time in unix milliseconds (0 if the clock is before 1970).
fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Releases the `flock` when dropped, so every exit path (including errors) unlocks.
struct FlockGuard<'a>(&'a File);

impl Drop for FlockGuard<'_> {
    fn drop(&mut self) {
        // Nothing useful can be done if unlocking fails; closing the descriptor (at the latest
        // when the process exits) releases the lock anyway.
        let _ = self.0.unlock();
    }
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> DcsError {
    DcsError::Unavailable(format!("local store: cannot {what} {}: {e}", path.display()))
}

impl Inner {
    /// Read and parse the data file, checking it belongs to this machine. Returns the parsed
    /// store, the stamp of the version read and its mtime.
    fn read_data(&self) -> DcsResult<(Data, Stamp, SystemTime)> {
        let mut file = File::open(&self.data_path).map_err(|e| {
            if e.kind() == ErrorKind::NotFound {
                // Recreating it silently would forget the cluster (its `initialize` key, its
                // terms) and could let a second bootstrap happen.
                DcsError::Corrupt(format!(
                    "{} is missing; it is created when the local store is opened and must not be removed",
                    self.data_path.display()
                ))
            } else {
                io_error("open", &self.data_path, e)
            }
        })?;
        // Stamp the descriptor we read from, so stamp and contents belong to the same version.
        let meta = file.metadata().map_err(|e| io_error("stat", &self.data_path, e))?;
        let mut buf = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
        file.read_to_end(&mut buf).map_err(|e| io_error("read", &self.data_path, e))?;
        let data: Data = serde_json::from_slice(&buf).map_err(|e| {
            DcsError::Corrupt(format!("{}: not a valid local store file: {e}", self.data_path.display()))
        })?;
        if data.machine_id != self.machine_id {
            return Err(DcsError::Misconfigured(format!(
                "this local store at {} was created on machine {}, but this is machine {}; the local store \
                 cannot be shared between machines — use the etcd DCS for multi-machine clusters (if this \
                 machine's identity really changed, edit machine_id in {})",
                self.dir.display(),
                data.machine_id,
                self.machine_id,
                self.data_path.display()
            )));
        }
        let mtime = meta.modified().unwrap_or(UNIX_EPOCH);
        Ok((data, Stamp::of(&meta), mtime))
    }

    /// Atomically replace the data file. Must be called with the lock held.
    ///
    /// The new file gets an mtime strictly later than `prev_mtime` (the version it replaces),
    /// so watchers comparing stamps see a change even when the filesystem reuses the inode
    /// number and the clock has not ticked since the previous write.
    fn write_data(&self, data: &Data, prev_mtime: SystemTime) -> DcsResult<()> {
        let bytes = serde_json::to_vec_pretty(data)
            .map_err(|e| DcsError::Unavailable(format!("local store: cannot encode the store: {e}")))?;
        let mut tmp = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&self.tmp_path)
            .map_err(|e| io_error("create", &self.tmp_path, e))?;
        tmp.write_all(&bytes).map_err(|e| io_error("write", &self.tmp_path, e))?;
        let mtime = SystemTime::now().max(prev_mtime + Duration::from_micros(1));
        tmp.set_modified(mtime).map_err(|e| io_error("set the mtime of", &self.tmp_path, e))?;
        // Durability of the contents before the rename makes them visible; the directory
        // entry itself is not fsynced (a crash may roll back the last write, never tear it).
        tmp.sync_data().map_err(|e| io_error("fsync", &self.tmp_path, e))?;
        drop(tmp);
        std::fs::rename(&self.tmp_path, &self.data_path).map_err(|e| io_error("rename over", &self.data_path, e))
    }

    /// Run `f` with the exclusive lock held. Blocking: call from `spawn_blocking`.
    fn with_lock<T>(&self, f: impl FnOnce(&Inner) -> DcsResult<T>) -> DcsResult<T> {
        // The mutex only guards the descriptor; a panic while holding it leaves nothing broken.
        let file = self.lock_file.lock().unwrap_or_else(PoisonError::into_inner);
        file.lock().map_err(|e| io_error("lock", &self.dir.join(LOCK_FILE), e))?;
        let _unlock = FlockGuard(&file);
        f(self)
    }

    /// Read-modify-write under the lock. Expired keys are purged first, so `f` only sees live
    /// keys; `f` returns its result and whether it changed the store. The file is rewritten
    /// only on a change, so the purge is persisted by the next successful write.
    fn modify<T>(&self, f: impl FnOnce(&mut Data, u64) -> (T, bool)) -> DcsResult<T> {
        self.with_lock(|inner| {
            let (mut data, _, mtime) = inner.read_data()?;
            let now = now_ms();
            data.keys.retain(|_, e| e.live_at(now));
            let (result, changed) = f(&mut data, now);
            if changed {
                inner.write_data(&data, mtime)?;
            }
            Ok(result)
        })
    }

    /// The current version of the data file for `watch`: reuses the cached parse while the
    /// file's stamp is unchanged (unless `force`), so an idle poll costs one `stat`.
    fn watch_snapshot(&self, force: bool) -> DcsResult<Arc<Data>> {
        if !force {
            let meta = std::fs::metadata(&self.data_path).map_err(|e| {
                if e.kind() == ErrorKind::NotFound {
                    DcsError::Corrupt(format!("{} is missing", self.data_path.display()))
                } else {
                    io_error("stat", &self.data_path, e)
                }
            })?;
            let stamp = Stamp::of(&meta);
            let cache = self.watch_cache.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(c) = cache.as_ref().filter(|c| c.stamp == stamp) {
                return Ok(c.data.clone());
            }
        }
        // No lock needed: the file is only ever replaced by rename, so this reads one complete
        // version, and waiting behind a writer's fsync would only delay the watcher.
        let (data, stamp, _) = self.read_data()?;
        let data = Arc::new(data);
        *self.watch_cache.lock().unwrap_or_else(PoisonError::into_inner) = Some(Cached { stamp, data: data.clone() });
        Ok(data)
    }

    /// The body of `watch`, run on a blocking thread: waits until `key` differs from `known`,
    /// `deadline` passes or `cancelled` is set (the caller dropped the watch).
    ///
    /// Waiting happens on a plain thread (inotify + `poll`, or `thread::sleep` when polling)
    /// rather than with tokio timers: on a multi-threaded runtime each timer wake-up also wakes
    /// sibling workers, which made a 25 ms poll cost ~0.6% of a core per idle watcher. With
    /// inotify an idle watcher wakes four times a second; `notify: false` forces polling.
    fn watch_blocking(
        &self,
        key: &str,
        known: Option<u64>,
        deadline: Instant,
        cancelled: &AtomicBool,
        notify: bool,
    ) -> DcsResult<Option<KeyValue>> {
        // Subscribe before the first look, so a write in between cannot be missed.
        let notifier = if notify { DirNotifier::new(&self.dir).ok() } else { None };
        let idle_wait = if notifier.is_some() { WATCH_NOTIFIED_RECHECK } else { WATCH_POLL };
        let mut last_read = Instant::now();
        let mut force = false;
        loop {
            let data = self.watch_snapshot(force)?;
            if force {
                last_read = Instant::now();
            }
            let now_ms = now_ms();
            let entry = data.live(key, now_ms);
            let now = Instant::now();
            if entry.map(|e| e.mod_revision) != known || now >= deadline || cancelled.load(Ordering::Relaxed) {
                return Ok(data.get(key, now_ms));
            }
            let mut wait = idle_wait.min(deadline - now);
            // Wake right when the known key expires instead of up to a poll interval later.
            if let Some(expires_at) = entry.and_then(|e| e.expires_at_ms) {
                wait = wait.min(Duration::from_millis(expires_at.saturating_sub(now_ms)));
            }
            drop(data);
            // A notified replacement of the file is re-read even if its stamp looks unchanged.
            force = match &notifier {
                Some(n) => n.wait(wait),
                None => {
                    std::thread::sleep(wait);
                    false
                }
            };
            force |= last_read.elapsed() >= WATCH_FORCED_REREAD;
        }
    }
}

/// Tells a waiting watch when the data file is replaced: an inotify instance watching the
/// store directory for renames into it (how every write lands) and deletions.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
struct DirNotifier {
    fd: OwnedFd,
}

#[cfg(target_os = "linux")]
impl DirNotifier {
    fn new(dir: &Path) -> std::io::Result<DirNotifier> {
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::io::FromRawFd;
        // SAFETY: a plain system call; the result is checked below.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a freshly created descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(|_| ErrorKind::InvalidInput)?;
        // SAFETY: `fd` is a valid inotify descriptor and `path` is NUL-terminated.
        let wd = unsafe { libc::inotify_add_watch(fd.as_raw_fd(), path.as_ptr(), libc::IN_MOVED_TO | libc::IN_DELETE) };
        if wd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(DirNotifier { fd })
    }

    /// Wait up to `timeout` for an event. Returns whether the data file was (or may have
    /// been) replaced; `false` after a timeout or events about other files.
    fn wait(&self, timeout: Duration) -> bool {
        let mut pfd = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // Round up, so a wait for an expiry never ends just before it.
        let ms = timeout.as_micros().div_ceil(1000);
        let ms = libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX);
        // SAFETY: `pfd` is one valid pollfd, matching the count passed.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        match rc {
            0 => false,
            rc if rc > 0 => self.drain(),
            _ => self.failed(),
        }
    }

    /// Read every pending event; whether one concerns the data file.
    fn drain(&self) -> bool {
        let mut buf = [0u8; 4096];
        let mut relevant = false;
        loop {
            // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            match usize::try_from(n) {
                Ok(0) => return true,
                Ok(n) => relevant |= events_mention_data_file(&buf[..n.min(buf.len())]),
                Err(_) => match std::io::Error::last_os_error().kind() {
                    ErrorKind::WouldBlock => return relevant,
                    ErrorKind::Interrupted => {}
                    _ => return self.failed(),
                },
            }
        }
    }

    /// inotify misbehaved: behave like one polling step (never spin) and assume a change.
    fn failed(&self) -> bool {
        std::thread::sleep(WATCH_POLL);
        true
    }
}

/// Other systems: no notification, `watch` polls.
#[cfg(not(target_os = "linux"))]
impl DirNotifier {
    fn new(_dir: &Path) -> std::io::Result<DirNotifier> {
        Err(ErrorKind::Unsupported.into())
    }

    fn wait(&self, timeout: Duration) -> bool {
        std::thread::sleep(timeout);
        false
    }
}

/// Whether a buffer of `inotify_event`s names the data file, or reports lost events
/// (queue overflow) or a removed watch, after which anything may have changed.
#[cfg(target_os = "linux")]
fn events_mention_data_file(buf: &[u8]) -> bool {
    // struct inotify_event { int wd; uint32_t mask, cookie, len; char name[len]; }
    const HEADER: usize = std::mem::size_of::<libc::inotify_event>();
    let u32_at = |at: usize| buf.get(at..at + 4).and_then(|b| b.try_into().ok()).map(u32::from_ne_bytes);
    let mut at = 0;
    while let (Some(mask), Some(len)) = (u32_at(at + 4), u32_at(at + 12)) {
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if mask & (libc::IN_Q_OVERFLOW | libc::IN_IGNORED) != 0 {
            return true;
        }
        let name = buf.get(at + HEADER..).unwrap_or_default();
        let name = &name[..len.min(name.len())];
        // The name is NUL-padded to an alignment boundary.
        let name = name.split(|&b| b == 0).next().unwrap_or_default();
        if name == DATA_FILE.as_bytes() {
            return true;
        }
        at = at.saturating_add(HEADER).saturating_add(len);
    }
    false
}

/// Sets the flag when dropped: tells a watch's polling thread that nobody waits for it.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Run blocking file work off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> DcsResult<T> + Send + 'static) -> DcsResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| DcsError::Unavailable(format!("local store: blocking task failed: {e}")))?
}

/// This machine's identity: `/etc/machine-id`, else `/var/lib/dbus/machine-id`, else the
/// hostname.
fn machine_identity() -> String {
    for path in ["/etc/machine-id", "/var/lib/dbus/machine-id"] {
        if let Ok(s) = std::fs::read_to_string(path) {
            let id = s.trim();
            if !id.is_empty() {
                return id.to_string();
            }
        }
    }
    match hostname() {
        Some(h) => format!("hostname:{h}"),
        None => "unknown".to_string(),
    }
}

fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the pointer and length describe `buf`, which outlives the call.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..len]).trim().to_string();
    (!name.is_empty()).then_some(name)
}

/// The network filesystem named by a `statfs` magic number, if it is one.
fn network_filesystem(magic: u32) -> Option<&'static str> {
    NETWORK_FILESYSTEMS.iter().find(|(m, _)| *m == magic).map(|(_, name)| *name)
}

/// Refuse directories on network filesystems.
#[cfg(target_os = "linux")]
fn check_local_filesystem(dir: &Path) -> DcsResult<()> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| DcsError::Misconfigured(format!("local store path {} contains a NUL byte", dir.display())))?;
    // SAFETY: an all-zero `statfs` is a valid value of this plain C struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `st` is a valid, writable `statfs`.
    if unsafe { libc::statfs(path.as_ptr(), &mut st) } != 0 {
        return Err(io_error("statfs", dir, std::io::Error::last_os_error()));
    }
    // `f_type` is a signed word whose width depends on the target; the magic numbers are
    // 32-bit patterns, so compare the low 32 bits.
    #[allow(clippy::unnecessary_cast)]
    let magic = st.f_type as u32;
    match network_filesystem(magic) {
        Some(fs) => Err(DcsError::Misconfigured(format!(
            "the local store directory {} is on a network filesystem ({fs}); file locks and atomic renames \
             cannot be trusted there and the local store cannot be shared between machines — put it on a \
             local disk, or use the etcd DCS for multi-machine clusters",
            dir.display()
        ))),
        None => Ok(()),
    }
}

/// Filesystem magic numbers are Linux-specific; elsewhere no check is made.
#[cfg(not(target_os = "linux"))]
fn check_local_filesystem(_dir: &Path) -> DcsResult<()> {
    Ok(())
}

impl LocalStore {
    /// Open (creating if needed) the store in `dir`: creates the directory (mode 0700), the
    /// lock file and an empty `store.json` recording this machine's identity.
    ///
    /// Fails with [`DcsError::Misconfigured`] when `dir` is on a network filesystem or the
    /// store was created on another machine, and with [`DcsError::Corrupt`] when `store.json`
    /// cannot be decoded. Does blocking file I/O (once, at startup).
    pub fn open(dir: &Path) -> DcsResult<LocalStore> {
        DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| io_error("create directory", dir, e))?;
        check_local_filesystem(dir)?;
        let lock_path = dir.join(LOCK_FILE);
        let lock_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| io_error("open", &lock_path, e))?;
        let inner = Inner {
            dir: dir.to_path_buf(),
            data_path: dir.join(DATA_FILE),
            tmp_path: dir.join(TMP_FILE),
            machine_id: machine_identity(),
            lock_file: Mutex::new(lock_file),
            watch_cache: Mutex::new(None),
        };
        // Under the lock, so two processes opening a fresh directory create the file once.
        inner.with_lock(|inner| {
            let exists = inner.data_path.try_exists().map_err(|e| io_error("stat", &inner.data_path, e))?;
            if exists {
                // Validates the file and that it was created on this machine.
                inner.read_data().map(|_| ())
            } else {
                let fresh = Data { revision: 0, machine_id: inner.machine_id.clone(), keys: BTreeMap::new() };
                inner.write_data(&fresh, UNIX_EPOCH)
            }
        })?;
        Ok(LocalStore { inner: Arc::new(inner) })
    }

    /// The store directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Run a read-modify-write on the blocking pool.
    async fn modify<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Data, u64) -> (T, bool) + Send + 'static,
    ) -> DcsResult<T> {
        let inner = self.inner.clone();
        blocking(move || inner.modify(f)).await
    }

    /// Run a read on the blocking pool. Reads take no lock: the file is only ever replaced by
    /// an atomic rename, so a read sees exactly the state after some completed write (the
    /// rename is each write's commit point), which keeps reads linearizable without waiting
    /// behind a writer's fsync.
    async fn read<T: Send + 'static>(&self, f: impl FnOnce(&Data, u64) -> T + Send + 'static) -> DcsResult<T> {
        let inner = self.inner.clone();
        blocking(move || {
            let (data, _, _) = inner.read_data()?;
            Ok(f(&data, now_ms()))
        })
        .await
    }
}

impl std::fmt::Debug for LocalStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalStore").field("dir", &self.inner.dir).finish_non_exhaustive()
    }
}

#[async_trait::async_trait]
impl Dcs for LocalStore {
    async fn get(&self, key: &str) -> DcsResult<Option<KeyValue>> {
        let key = key.to_string();
        self.read(move |data, now| data.get(&key, now)).await
    }

    async fn list(&self, prefix: &str) -> DcsResult<Vec<KeyValue>> {
        let prefix = prefix.to_string();
        self.read(move |data, now| {
            data.keys
                .range(prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(&prefix))
                .filter(|(_, e)| e.live_at(now))
                .map(|(k, e)| e.key_value(k, now))
                .collect()
        })
        .await
    }

    async fn put(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> DcsResult<u64> {
        let (key, value) = (key.to_string(), value.to_vec());
        self.modify(move |data, now| (data.write(&key, &value, ttl, now), true)).await
    }

    async fn create(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> DcsResult<Option<u64>> {
        let (key, value) = (key.to_string(), value.to_vec());
        self.modify(move |data, now| {
            if data.live(&key, now).is_some() {
                (None, false)
            } else {
                (Some(data.write(&key, &value, ttl, now)), true)
            }
        })
        .await
    }

    async fn compare_and_set(
        &self,
        key: &str,
        value: &[u8],
        expected: u64,
        ttl: Option<Duration>,
    ) -> DcsResult<Option<u64>> {
        let (key, value) = (key.to_string(), value.to_vec());
        self.modify(move |data, now| match data.live(&key, now) {
            Some(e) if e.mod_revision == expected => (Some(data.write(&key, &value, ttl, now)), true),
            _ => (None, false),
        })
        .await
    }

    async fn delete(&self, key: &str, expected: Option<u64>) -> DcsResult<bool> {
        let key = key.to_string();
        self.modify(move |data, now| match data.live(&key, now) {
            Some(e) if expected.is_none_or(|rev| rev == e.mod_revision) => {
                data.keys.remove(&key);
                data.revision += 1;
                (true, true)
            }
            _ => (false, false),
        })
        .await
    }

    async fn watch(&self, key: &str, known: Option<u64>, timeout: Duration) -> DcsResult<Option<KeyValue>> {
        let deadline = Instant::now() + timeout;
        let cancelled = Arc::new(AtomicBool::new(false));
        // Dropping the watch future (e.g. in a `select!`) stops the polling thread within one
        // poll interval.
        let _cancel = CancelOnDrop(cancelled.clone());
        let (inner, key) = (self.inner.clone(), key.to_string());
        blocking(move || inner.watch_blocking(&key, known, deadline, &cancelled, true)).await
    }

    fn describe(&self) -> String {
        format!("local:{}", self.inner.dir.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(hex_decode(&hex_encode(&bytes)).unwrap(), bytes);
        assert!(hex_decode("abc").is_err());
        assert!(hex_decode("zz").is_err());
    }

    #[test]
    fn entries_store_utf8_as_text_and_other_bytes_as_hex() {
        let text = Entry { value: b"{\"a\":1}".to_vec(), create_revision: 1, mod_revision: 2, expires_at_ms: None };
        let json = serde_json::to_value(&text).unwrap();
        assert_eq!(json["value"], "{\"a\":1}");
        assert!(json.get("hex").is_none());
        let binary =
            Entry { value: vec![0xff, 0x00, 0x80], create_revision: 1, mod_revision: 2, expires_at_ms: Some(5) };
        let json = serde_json::to_value(&binary).unwrap();
        assert_eq!(json["value"], "ff0080");
        assert_eq!(json["hex"], true);
        let back: Entry = serde_json::from_value(json).unwrap();
        assert_eq!(back.value, binary.value);
        assert_eq!(back.expires_at_ms, Some(5));
    }

    #[test]
    fn ttl_rounds_up_to_whole_milliseconds() {
        assert_eq!(ttl_ms(Duration::from_secs(1)), 1000);
        assert_eq!(ttl_ms(Duration::from_micros(1500)), 2);
        assert_eq!(ttl_ms(Duration::from_nanos(1)), 1);
        assert_eq!(ttl_ms(Duration::MAX), u64::MAX);
    }

    #[test]
    fn network_filesystems_are_recognised() {
        assert_eq!(network_filesystem(0x6969), Some("NFS"));
        assert_eq!(network_filesystem(0xFF53_4D42), Some("CIFS"));
        assert_eq!(network_filesystem(0xFE53_4D42), Some("SMB2"));
        assert_eq!(network_filesystem(0x517B), Some("SMB"));
        assert_eq!(network_filesystem(0xEF53), None); // ext4
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn inotify_events_are_parsed() {
        fn event(mask: u32, name: &str) -> Vec<u8> {
            let mut padded = name.as_bytes().to_vec();
            padded.resize(if name.is_empty() { 0 } else { (name.len() + 1).next_multiple_of(16) }, 0);
            let mut e = Vec::new();
            e.extend_from_slice(&1i32.to_ne_bytes());
            e.extend_from_slice(&mask.to_ne_bytes());
            e.extend_from_slice(&0u32.to_ne_bytes());
            e.extend_from_slice(&u32::try_from(padded.len()).unwrap().to_ne_bytes());
            e.extend_from_slice(&padded);
            e
        }
        let other = event(libc::IN_MOVED_TO, "store.json.tmp");
        assert!(!events_mention_data_file(&other));
        assert!(events_mention_data_file(&[other.clone(), event(libc::IN_MOVED_TO, DATA_FILE)].concat()));
        assert!(events_mention_data_file(&event(libc::IN_Q_OVERFLOW, "")));
        assert!(!events_mention_data_file(&[]));
        // A truncated buffer must not panic.
        assert!(!events_mention_data_file(&other[..20]));
    }

    /// The polling fallback (no inotify) notices changes and expiry too.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn polling_watch_sees_changes_and_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        let poll = |key: &'static str, known: Option<u64>| {
            let inner = store.inner.clone();
            let deadline = Instant::now() + Duration::from_secs(5);
            tokio::task::spawn_blocking(move || {
                let t = Instant::now();
                let got = inner.watch_blocking(key, known, deadline, &AtomicBool::new(false), false).unwrap();
                (got, t.elapsed())
            })
        };
        let rev = store.put("/k", b"1", None).await.unwrap();
        let watch = poll("/k", Some(rev));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let rev2 = LocalStore::open(dir.path()).unwrap().put("/k", b"2", None).await.unwrap();
        let (got, took) = watch.await.unwrap();
        assert_eq!(got.unwrap().mod_revision, rev2);
        assert!(took < Duration::from_secs(2), "{took:?}");

        let rev = store.put("/ttl", b"1", Some(Duration::from_millis(200))).await.unwrap();
        let (got, took) = poll("/ttl", Some(rev)).await.unwrap();
        assert_eq!(got, None);
        assert!(took < Duration::from_secs(2), "{took:?}");
    }

    /// A dropped watch stops its thread soon, instead of running until its timeout.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cancelled_watch_stops() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        let cancelled = Arc::new(AtomicBool::new(false));
        let (inner, flag) = (store.inner.clone(), cancelled.clone());
        let deadline = Instant::now() + Duration::from_secs(30);
        let t = Instant::now();
        let task = tokio::task::spawn_blocking(move || inner.watch_blocking("/k", None, deadline, &flag, true));
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(CancelOnDrop(cancelled));
        assert_eq!(task.await.unwrap().unwrap(), None);
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }

    #[test]
    fn machine_identity_is_not_empty() {
        assert!(!machine_identity().is_empty());
    }
}
