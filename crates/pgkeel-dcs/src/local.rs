//! The embedded single-host store used by `pgkeel up`.
//!
//! This module owns [`LocalStore`]: a [`Dcs`] kept in JSON files that several agent processes
//! on the same machine share through a directory. It takes no lock, so no process can hold
//! the others up: an agent that is stopped (`SIGSTOP`, a debugger, a VM pause) or killed in
//! the middle of a write leaves the store writable for everyone else. (It used to serialise
//! writers with an `flock`; an agent frozen while holding it froze every write of the
//! cluster, so no replica could take over from the frozen primary.)
//!
//! - `store.<generation, 20 digits>.json`: one complete version of the store each
//!   (`revision`, `machine_id`, `keys`). The highest generation is the current state; the
//!   [`KEEP_VERSIONS`] before it are kept so a reader that listed the directory can still
//!   open what it found, older ones are removed.
//! - A write reads the newest version (generation `g`), computes the new state, writes it to
//!   a private file under `tmp/`, fsyncs it and publishes it with `link(2)` as generation
//!   `g + 1`. `link` fails if that name exists, so it is an atomic compare-and-swap: of the
//!   writers that read `g`, exactly one commits and the others start over from the version
//!   that won. The link is each write's commit point and readers (which take no lock) see
//!   the state after some completed write, so operations stay linearizable.
//! - A write that took longer than [`MAX_WRITE_AGE`] from its read to its commit (its
//!   process was stopped or starved) starts over instead of committing: which keys it saw
//!   alive (TTLs are wall-clock deadlines) may no longer be true.
//! - Old versions are removed, oldest first, once [`KEEP_VERSIONS`] newer ones exist and the
//!   next-but-[`KEEP_VERSIONS`] was computed [`REMOVE_AFTER`] ago. Removal frees names, so a
//!   successful `link` alone does not prove the compare-and-swap: a writer stopped between
//!   its read of `g` and its link while `g + 1` was published *and removed* would find the
//!   name free again, and its write would be lost behind the newer versions while it reported
//!   success. So after linking, a writer confirms: the version it read still exists (checked
//!   by inode, on the file it keeps open; removal is oldest first, so nothing after it was
//!   removed and the name it linked had never been used); or it is the newest version; or the
//!   version after it names it as parent (each version records its own unique `id` and its
//!   `parent`'s). A version after it that names another parent means the write lost and
//!   starts over; with no version after it left either (a stall longer than
//!   [`REMOVE_AFTER`] plus [`KEEP_VERSIONS`] more writes) the outcome cannot be told and the
//!   write fails as unavailable, like an etcd request that timed out.
//!
//! TTLs are wall-clock deadlines (unix ms), because the processes sharing the store have no
//! common monotonic clock. An expired key is absent for every operation and is dropped from
//! the store by the next write.
//!
//! `watch` waits for inotify events on the directory in the caller's runtime (falling back to
//! polling the directory every 25 ms on a thread of its own), re-parses only when a newer
//! generation appeared, and then builds only the watched keys (the other keys' JSON is checked
//! and skipped), and wakes exactly when the watched key's TTL runs out. Reads run in
//! place on a single-threaded runtime (the proxy's) and on the blocking pool otherwise.
//!
//! The store refuses to be shared between machines: `link` atomicity only holds on a local
//! filesystem, and two machines each running "the" local store would each elect a leader.
//! The creating machine's identity is recorded in every version and checked on every read,
//! and network filesystems are rejected when the store is opened.
//!
//! Stores of the earlier layout (one `store.json` replaced by rename under `store.lock`) are
//! adopted when opened: `store.json` becomes generation 1 and is removed, so an older pgkeel
//! still running on the directory fails ("store.json is missing") instead of writing beside
//! this one.

use std::collections::BTreeMap;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::{Dcs, DcsError, DcsResult, KeyValue};

/// Version files are named `store.<generation, 20 digits>.json`.
const VERSION_PREFIX: &str = "store.";
const VERSION_SUFFIX: &str = ".json";
/// Subdirectory for files being written, so their creation wakes no watcher.
const TMP_DIR: &str = "tmp";
/// The data file of the earlier layout, adopted at open.
const LEGACY_FILE: &str = "store.json";
/// The lock file of the earlier layout, removed with it.
const LEGACY_LOCK: &str = "store.lock";
/// Versions kept behind the newest. A reader fails to open the newest version it listed only
/// if this many writes committed in between, and then simply lists again.
const KEEP_VERSIONS: u64 = 16;
/// A write whose read is older than this when it is ready to commit starts over.
const MAX_WRITE_AGE: Duration = Duration::from_secs(1);
/// A version is removed only once the version [`KEEP_VERSIONS`] - 1 after it was computed at
/// least this long ago (on the machine's boot clock), so a writer has to be held up for about
/// this long to meet a freed name (see the module documentation); the number of versions kept
/// grows with the write rate (about rate x this) but stays [`KEEP_VERSIONS`] when writes are
/// slower than one per [`REMOVE_AFTER`] / [`KEEP_VERSIONS`].
const REMOVE_AFTER: Duration = Duration::from_secs(2);
/// How many times a write starts over for being too slow before it reports the store
/// unavailable (e.g. every fsync takes longer than [`MAX_WRITE_AGE`]).
const MAX_SLOW_ATTEMPTS: u32 = 10;
/// Temporary files older than this are left over from a crashed writer; `open` removes them.
const ABANDONED_TMP_AGE: Duration = Duration::from_secs(600);

/// How often `watch` lists the directory when it cannot be notified of changes (inotify
/// unavailable). Each look is a few system calls, but each wake-up of the sleeping thread
/// costs tens of microseconds on a VM: about 0.2-0.4% of a core per watcher at this rate.
const WATCH_POLL: Duration = Duration::from_millis(25);
/// How often `watch` looks at the directory when inotify tells it about changes: only a
/// safety net.
const WATCH_NOTIFIED_RECHECK: Duration = Duration::from_secs(5);

/// Filesystem magic numbers (`statfs.f_type`) of network filesystems, on which neither
/// `link` nor rename atomicity can be trusted across machines.
const NETWORK_FILESYSTEMS: &[(u32, &str)] =
    &[(0x6969, "NFS"), (0x517B, "SMB"), (0xFF53_4D42, "CIFS"), (0xFE53_4D42, "SMB2")];

/// The embedded single-host DCS: versioned JSON files in a directory shared by the agent
/// processes of one machine. See the [module documentation](self) for the design.
///
/// Cloning is cheap and clones share one watch cache.
#[derive(Clone)]
pub struct LocalStore {
    inner: Arc<Inner>,
}

/// State shared by the clones of one [`LocalStore`] and the blocking tasks it spawns.
struct Inner {
    dir: PathBuf,
    tmp_dir: PathBuf,
    /// Identity of this machine, compared with the one recorded in the store.
    machine_id: String,
    /// Numbers this process's temporary files and writes.
    tmp_counter: AtomicU64,
    /// [`REMOVE_AFTER`], shorter in tests.
    remove_after: Duration,
    /// The keys watched and the last version parsed for them, used only by `watch`.
    watch_cache: Mutex<WatchCache>,
}

/// The most keys [`WatchCache`] parses versions for; more were watched once (it starts over).
const WATCH_CACHE_KEYS: usize = 16;

/// What `watch` parsed last: the newest version for the keys watched, holding those only.
#[derive(Default)]
struct WatchCache {
    keys: Vec<String>,
    version: Option<Cached>,
}

/// A parsed version of the store and its generation.
struct Cached {
    generation: u64,
    data: Arc<Data>,
}

/// Parses a version of the store keeping only the entries of some keys
/// ([`Inner::read_file_of`]): the other keys' entries are checked as JSON and skipped without
/// being built. The result has the version's `revision` and `machine_id`, and none of the
/// fields only writes use.
struct OnlyKeys<'k>(&'k [String]);

impl<'de> serde::de::DeserializeSeed<'de> for OnlyKeys<'_> {
    type Value = Data;

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<Data, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for OnlyKeys<'_> {
    type Value = Data;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a local store version (an object with revision, machine_id and keys)")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Data, A::Error> {
        use serde::de::{Error, IgnoredAny};
        let (mut revision, mut machine_id, mut keys) = (None, None, None);
        while let Some(field) = map.next_key::<String>()? {
            match field.as_str() {
                "revision" => revision = Some(map.next_value()?),
                "machine_id" => machine_id = Some(map.next_value()?),
                "keys" => keys = Some(map.next_value_seed(OnlyKeysEntries(self.0))?),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Data {
            revision: revision.ok_or_else(|| A::Error::missing_field("revision"))?,
            machine_id: machine_id.ok_or_else(|| A::Error::missing_field("machine_id"))?,
            keys: keys.ok_or_else(|| A::Error::missing_field("keys"))?,
            id: String::new(),
            parent: String::new(),
            computed_ms: Vec::new(),
        })
    }
}

/// The `keys` object of a version, with only some keys' entries built ([`OnlyKeys`]).
struct OnlyKeysEntries<'k>(&'k [String]);

impl<'de> serde::de::DeserializeSeed<'de> for OnlyKeysEntries<'_> {
    type Value = BTreeMap<String, Entry>;

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for OnlyKeysEntries<'_> {
    type Value = BTreeMap<String, Entry>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an object of keys")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut keys = BTreeMap::new();
        while let Some(wanted) = map.next_key_seed(WantedKey(self.0))? {
            if let Some(key) = wanted {
                keys.insert(key.clone(), map.next_value::<Entry>()?);
            } else {
                map.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok(keys)
    }
}

/// Which of the wanted keys a key in `keys` is, if any, compared where it was read (not
/// copied).
struct WantedKey<'k>(&'k [String]);

impl<'de, 'k> serde::de::DeserializeSeed<'de> for WantedKey<'k> {
    type Value = Option<&'k String>;

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de, 'k> serde::de::Visitor<'de> for WantedKey<'k> {
    type Value = Option<&'k String>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a key name")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(self.0.iter().find(|k| *k == v))
    }
}

/// The file name of `generation`.
fn version_name(generation: u64) -> String {
    format!("{VERSION_PREFIX}{generation:020}{VERSION_SUFFIX}")
}

/// The generation a file name stands for, if it names a version.
fn parse_version(name: &[u8]) -> Option<u64> {
    let digits = name.strip_prefix(VERSION_PREFIX.as_bytes())?.strip_suffix(VERSION_SUFFIX.as_bytes())?;
    if digits.len() != 20 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
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
    /// Unique name of the write that produced this version (empty in versions written by an
    /// earlier pgkeel).
    #[serde(default)]
    id: String,
    /// `id` of the version this one was computed from.
    #[serde(default)]
    parent: String,
    /// When this version and the ones before it were computed, newest first, at most
    /// [`KEEP_VERSIONS`] (milliseconds of the machine's boot clock): decides when old versions
    /// may be removed.
    #[serde(default)]
    computed_ms: Vec<u64>,
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

fn io_error(what: &str, path: &Path, e: std::io::Error) -> DcsError {
    DcsError::Unavailable(format!("local store: cannot {what} {}: {e}", path.display()))
}

/// What publishing a version found.
enum Commit {
    /// The version is published.
    Done,
    /// Another writer published that generation first (or the temporary file was removed as
    /// abandoned while this process was stopped): start over from the newest version.
    Lost,
}

/// Where a read-modify-write read its state from.
struct ReadFrom {
    /// Generation of the version read (the newest when listed).
    generation: u64,
    /// The oldest generation the same listing found: removal starts there.
    oldest: u64,
    /// The version's file, kept open so its inode number cannot be reused while the write
    /// confirms, by inode, that this version still exists.
    file: File,
}

/// Milliseconds of the machine's boot clock: shared by every process of the machine and
/// never stepped (unlike the wall clock). `None` if it cannot be read.
fn boot_ms() -> Option<u64> {
    #[cfg(target_os = "linux")]
    const CLOCK: libc::clockid_t = libc::CLOCK_BOOTTIME;
    #[cfg(not(target_os = "linux"))]
    const CLOCK: libc::clockid_t = libc::CLOCK_MONOTONIC;
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes only the timespec it is given.
    if unsafe { libc::clock_gettime(CLOCK, &mut ts) } != 0 {
        return None;
    }
    let secs = u64::try_from(ts.tv_sec).ok()?;
    let ms = u64::try_from(ts.tv_nsec / 1_000_000).ok()?;
    secs.checked_mul(1000)?.checked_add(ms)
}

impl Inner {
    fn version_path(&self, generation: u64) -> PathBuf {
        self.dir.join(version_name(generation))
    }

    /// The error for a directory without any version.
    fn missing(&self) -> DcsError {
        // Recreating it silently would forget the cluster (its `initialize` key, its terms)
        // and could let a second bootstrap happen.
        DcsError::Corrupt(format!(
            "the local store in {} is missing: it holds no {VERSION_PREFIX}<generation>{VERSION_SUFFIX} file; \
             the store is created when it is opened and its files must not be removed",
            self.dir.display()
        ))
    }

    /// The newest and the oldest generation in the directory, if any.
    fn listing(&self) -> DcsResult<Option<(u64, u64)>> {
        use std::os::unix::ffi::OsStrExt;
        let entries = std::fs::read_dir(&self.dir).map_err(|e| io_error("list", &self.dir, e))?;
        let mut found: Option<(u64, u64)> = None;
        for entry in entries {
            let entry = entry.map_err(|e| io_error("list", &self.dir, e))?;
            if let Some(g) = parse_version(entry.file_name().as_bytes()) {
                found = Some(found.map_or((g, g), |(newest, oldest)| (newest.max(g), oldest.min(g))));
            }
        }
        Ok(found)
    }

    /// The newest generation in the directory, if any.
    fn newest(&self) -> DcsResult<Option<u64>> {
        Ok(self.listing()?.map(|(newest, _)| newest))
    }

    /// Parse the file at `path`, checking it belongs to this machine; returns it still open.
    /// `None` if it does not exist.
    fn read_file(&self, path: &Path) -> DcsResult<Option<(Data, File)>> {
        self.read_file_of(path, None)
    }

    /// [`Inner::read_file`], with only the keys `only` (if given) of the version's keys: the
    /// others are checked as JSON but not built (see [`OnlyKeys`]).
    fn read_file_of(&self, path: &Path, only: Option<&[String]>) -> DcsResult<Option<(Data, File)>> {
        let mut file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error("open", path, e)),
        };
        let mut buf = Vec::new();
        file.read_to_end(&mut buf).map_err(|e| io_error("read", path, e))?;
        let parsed = match only {
            None => serde_json::from_slice(&buf),
            Some(keys) => {
                use serde::de::DeserializeSeed;
                let mut de = serde_json::Deserializer::from_slice(&buf);
                OnlyKeys(keys).deserialize(&mut de).and_then(|data| de.end().map(|()| data))
            }
        };
        let data: Data =
            parsed.map_err(|e| DcsError::Corrupt(format!("{}: not a valid local store file: {e}", path.display())))?;
        if data.machine_id != self.machine_id {
            return Err(DcsError::Misconfigured(format!(
                "this local store at {} was created on machine {}, but this is machine {}; the local store \
                 cannot be shared between machines — use the etcd DCS for multi-machine clusters (if this \
                 machine's identity really changed, edit machine_id in {})",
                self.dir.display(),
                data.machine_id,
                self.machine_id,
                path.display()
            )));
        }
        Ok(Some((data, file)))
    }

    /// The newest version, and where it was read from.
    fn read_data(&self) -> DcsResult<(Data, ReadFrom)> {
        self.read_data_of(None)
    }

    /// [`Inner::read_data`], with only the keys `only` (if given), as [`Inner::read_file_of`].
    fn read_data_of(&self, only: Option<&[String]>) -> DcsResult<(Data, ReadFrom)> {
        // The newest version listed disappears only after KEEP_VERSIONS more writes; listing
        // again finds a newer one. Bounded so a directory emptied meanwhile cannot spin.
        for _ in 0..1000 {
            let (generation, oldest) = self.listing()?.ok_or_else(|| self.missing())?;
            if let Some((data, file)) = self.read_file_of(&self.version_path(generation), only)? {
                return Ok((data, ReadFrom { generation, oldest, file }));
            }
        }
        Err(DcsError::Unavailable(format!(
            "local store: the versions in {} keep disappearing while being read",
            self.dir.display()
        )))
    }

    /// The version `generation` found by a listing; the newest one if it was removed since
    /// (after KEEP_VERSIONS more writes). With only the keys `only`, if given, as
    /// [`Inner::read_file_of`].
    fn read_listed(&self, generation: u64, only: Option<&[String]>) -> DcsResult<(Data, u64)> {
        match self.read_file_of(&self.version_path(generation), only)? {
            Some((data, _)) => Ok((data, generation)),
            None => self.read_data_of(only).map(|(data, read)| (data, read.generation)),
        }
    }

    /// Mark `data`, computed from a version whose id is `data.id`, as a new version: a fresh
    /// id, that version as parent, and the time it was computed.
    fn stamp(&self, data: &mut Data) {
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        // Unique: no two writes of one process share a counter, no two processes a pid at once.
        let id = format!("{}-{n}-{nanos}", std::process::id());
        data.parent = std::mem::replace(&mut data.id, id);
        data.computed_ms.insert(0, boot_ms().unwrap_or(u64::MAX));
        data.computed_ms.truncate(usize::try_from(KEEP_VERSIONS).unwrap_or(usize::MAX));
    }

    /// Write `data` to a new private temporary file and fsync it.
    fn write_tmp(&self, data: &Data) -> DcsResult<PathBuf> {
        let bytes = serde_json::to_vec_pretty(data)
            .map_err(|e| DcsError::Unavailable(format!("local store: cannot encode the store: {e}")))?;
        let (mut file, path) = loop {
            let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
            let path = self.tmp_dir.join(format!("{}.{n}", std::process::id()));
            match OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path) {
                Ok(f) => break (f, path),
                // Left over by a crashed process that had this pid: take the next number.
                Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io_error("create", &path, e)),
            }
        };
        let written = file.write_all(&bytes).map_err(|e| io_error("write", &path, e));
        // Durability of the contents before the link makes them visible; the directory entry
        // itself is not fsynced (a crash may roll back the last write, never tear it).
        let synced = written.and_then(|()| file.sync_data().map_err(|e| io_error("fsync", &path, e)));
        if let Err(e) = synced {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        Ok(path)
    }

    /// Link the temporary file `tmp` as `generation` (and remove `tmp` either way): false if
    /// that name exists (or `tmp` was removed as abandoned while this process was stopped).
    fn link(&self, tmp: &Path, generation: u64) -> DcsResult<bool> {
        let target = self.version_path(generation);
        let linked = std::fs::hard_link(tmp, &target);
        let _ = std::fs::remove_file(tmp);
        match linked {
            Ok(()) => Ok(true),
            Err(e) if matches!(e.kind(), ErrorKind::AlreadyExists | ErrorKind::NotFound) => Ok(false),
            Err(e) => Err(io_error("publish", &target, e)),
        }
    }

    /// Publish the temporary file `tmp` holding `ours`, computed from `read`, as the next
    /// generation, and remove what that makes old.
    fn commit(&self, tmp: &Path, read: &ReadFrom, ours: &Data) -> DcsResult<Commit> {
        let generation = read.generation + 1;
        if !self.link(tmp, generation)? {
            return Ok(Commit::Lost);
        }
        let commit = self.confirm(read, ours)?;
        if let Commit::Done = commit {
            self.remove_old(read.oldest, generation, ours);
        }
        Ok(commit)
    }

    /// After `ours` was linked as `read.generation + 1`: whether that name was still unused,
    /// i.e. whether the link really was the compare-and-swap it stands for (see the module
    /// documentation).
    fn confirm(&self, read: &ReadFrom, ours: &Data) -> DcsResult<Commit> {
        let generation = read.generation + 1;
        // Removal goes oldest first: while the version read is there, no later one was removed.
        let read_is_there = match (read.file.metadata(), std::fs::metadata(self.version_path(read.generation))) {
            (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
            _ => false,
        };
        // A name is freed only after KEEP_VERSIONS later versions existed, and the newest
        // version is never removed.
        if read_is_there || self.newest()? == Some(generation) {
            return Ok(Commit::Done);
        }
        match self.read_file(&self.version_path(generation + 1))? {
            Some((next, _)) if next.parent == ours.id => Ok(Commit::Done),
            // The name had been used and freed: the version there now is not in the history.
            Some(_) => Ok(Commit::Lost),
            None => Err(DcsError::Unavailable(format!(
                "local store: a write to {} was held up (its process stopped or starved) for so long that \
                 whether it took effect can no longer be told; read the store again before retrying",
                self.dir.display()
            ))),
        }
    }

    /// The newest generation that may be removed once `newest`, holding `data`, exists: the
    /// versions KEEP_VERSIONS behind it, once the one after them is REMOVE_AFTER old.
    fn removable(&self, newest: u64, data: &Data) -> Option<u64> {
        let keep = usize::try_from(KEEP_VERSIONS).ok()?;
        let computed = *data.computed_ms.get(keep - 1)?;
        let remove_after = u64::try_from(self.remove_after.as_millis()).ok()?;
        let old_enough = computed.checked_add(remove_after)? <= boot_ms()?;
        newest.checked_sub(KEEP_VERSIONS).filter(|&g| g > 0 && old_enough)
    }

    /// Remove the versions from `oldest` up to what [`Inner::removable`] allows, oldest first
    /// and stopping at the first that cannot be removed, so that a version still there means
    /// none after it was removed (what [`Inner::confirm`] relies on).
    fn remove_old(&self, oldest: u64, newest: u64, data: &Data) {
        let Some(last) = self.removable(newest, data) else { return };
        for generation in oldest..=last {
            match std::fs::remove_file(self.version_path(generation)) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(_) => return,
            }
        }
    }

    /// Read-modify-write. Expired keys are purged first, so `f` only sees live keys; `f`
    /// returns its result and whether it changed the store. A version is published only on a
    /// change, so the purge is persisted by the next successful write. `f` runs again on the
    /// newer state whenever another writer committed first.
    fn modify<T>(&self, mut f: impl FnMut(&mut Data, u64) -> (T, bool)) -> DcsResult<T> {
        let mut slow = 0;
        loop {
            let (mut data, read) = self.read_data()?;
            let read_at = Instant::now();
            let now = now_ms();
            data.keys.retain(|_, e| e.live_at(now));
            let (result, changed) = f(&mut data, now);
            if !changed {
                return Ok(result);
            }
            self.stamp(&mut data);
            let tmp = self.write_tmp(&data)?;
            if read_at.elapsed() > MAX_WRITE_AGE {
                let _ = std::fs::remove_file(&tmp);
                slow += 1;
                if slow >= MAX_SLOW_ATTEMPTS {
                    return Err(DcsError::Unavailable(format!(
                        "local store: {slow} writes in a row took longer than {MAX_WRITE_AGE:?} from read to \
                         commit; is the disk under {} very slow?",
                        self.dir.display()
                    )));
                }
                continue;
            }
            match self.commit(&tmp, &read, &data)? {
                Commit::Done => return Ok(result),
                Commit::Lost => continue,
            }
        }
    }

    /// Make sure the directory holds a version (creating an empty store or adopting the
    /// earlier layout's file), check it, and remove leftovers. Run once by `open`.
    fn initialise(&self) -> DcsResult<()> {
        let legacy = self.dir.join(LEGACY_FILE);
        for _ in 0..3 {
            if let Some((newest, oldest)) = self.listing()? {
                // Validates the newest version and that it was created on this machine.
                let (data, newest) = self.read_listed(newest, None)?;
                self.sweep(newest, oldest, &data);
                return Ok(());
            }
            let tmp = match self.read_file(&legacy)? {
                // Adopt the earlier layout's file as generation 1 (validated by the read).
                Some(_) => {
                    let tmp = self.tmp_dir.join(format!("{}.legacy", std::process::id()));
                    let _ = std::fs::remove_file(&tmp);
                    std::fs::hard_link(&legacy, &tmp).map_err(|e| io_error("link", &legacy, e))?;
                    tmp
                }
                None => {
                    let mut data = Data {
                        revision: 0,
                        machine_id: self.machine_id.clone(),
                        keys: BTreeMap::new(),
                        id: String::new(),
                        parent: String::new(),
                        computed_ms: Vec::new(),
                    };
                    self.stamp(&mut data);
                    self.write_tmp(&data)?
                }
            };
            // Two processes opening a fresh directory: one link wins, the other reads it.
            self.link(&tmp, 1)?;
        }
        Err(self.missing())
    }

    /// Remove what is no longer needed: old versions from `oldest` on (by the same rule as
    /// writes, `newest` holding `data`), temporary files abandoned by crashed writers and the
    /// earlier layout's files. Errors are ignored: leftovers only take space.
    fn sweep(&self, newest: u64, oldest: u64, data: &Data) {
        let legacy = self.dir.join(LEGACY_FILE);
        if let (Ok(a), Ok(b)) = (std::fs::metadata(&legacy), std::fs::metadata(self.version_path(1))) {
            // Adopted as generation 1 (the same file): remove it, so an older pgkeel fails.
            if (a.dev(), a.ino()) == (b.dev(), b.ino()) {
                let _ = std::fs::remove_file(&legacy);
            }
        }
        if std::fs::metadata(&legacy).is_err() {
            let _ = std::fs::remove_file(self.dir.join(LEGACY_LOCK));
            let _ = std::fs::remove_file(self.dir.join(format!("{LEGACY_FILE}.tmp")));
        }
        self.remove_old(oldest, newest, data);
        if let Ok(entries) = std::fs::read_dir(&self.tmp_dir) {
            for entry in entries.flatten() {
                let age = entry.metadata().and_then(|m| m.modified()).ok().and_then(|m| m.elapsed().ok());
                if age.is_some_and(|a| a > ABANDONED_TMP_AGE) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
    }

    /// The newest version for a `watch` of `key`, holding only the keys watched: reuses the
    /// cached parse while no newer generation appeared, so an idle look costs one directory
    /// listing. A new version is parsed once for every key watched ([`OnlyKeys`]), and only
    /// those are built: the store also holds every member's status, and building all of it at
    /// each write (the agents' and each proxy's, several a second) was most of a watch's cost
    /// (76k instructions a version against 48k now; docs/benchmarks.md, "Proxy").
    fn watch_snapshot(&self, key: &str) -> DcsResult<Arc<Data>> {
        let newest = self.newest()?.ok_or_else(|| self.missing())?;
        let keys = {
            let mut cache = self.watch_cache.lock().unwrap_or_else(PoisonError::into_inner);
            if !cache.keys.iter().any(|k| k == key) {
                if cache.keys.len() >= WATCH_CACHE_KEYS {
                    cache.keys.clear();
                }
                cache.keys.push(key.to_string());
                cache.version = None;
            }
            if let Some(c) = cache.version.as_ref().filter(|c| c.generation == newest) {
                return Ok(c.data.clone());
            }
            cache.keys.clone()
        };
        let (data, generation) = self.read_listed(newest, Some(&keys))?;
        let data = Arc::new(data);
        let mut cache = self.watch_cache.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.keys == keys {
            cache.version = Some(Cached { generation, data: data.clone() });
        }
        Ok(data)
    }

    /// One look for `watch`: the answer once `key` differs from `known` or `deadline` has
    /// passed, else how long to wait at most before looking again (until the deadline, or
    /// until the known key expires).
    fn watch_look(&self, key: &str, known: Option<u64>, deadline: Instant) -> DcsResult<Look> {
        let data = self.watch_snapshot(key)?;
        let now_ms = now_ms();
        let entry = data.live(key, now_ms);
        let now = Instant::now();
        if entry.map(|e| e.mod_revision) != known || now >= deadline {
            return Ok(Look::Done(data.get(key, now_ms)));
        }
        let mut wait = deadline - now;
        // Wake right when the known key expires instead of up to a poll interval later.
        if let Some(expires_at) = entry.and_then(|e| e.expires_at_ms) {
            wait = wait.min(Duration::from_millis(expires_at.saturating_sub(now_ms)));
        }
        Ok(Look::Wait(wait))
    }

    /// `watch` where the directory cannot be watched with inotify: looks every
    /// [`WATCH_POLL`], on a blocking thread, until `cancelled` is set (the caller dropped the
    /// watch). A plain thread rather than tokio timers: on a multi-threaded runtime each timer
    /// wake-up also wakes sibling workers, which made a 25 ms poll cost ~0.6% of a core.
    fn watch_polling(
        &self,
        key: &str,
        known: Option<u64>,
        deadline: Instant,
        cancelled: &AtomicBool,
    ) -> DcsResult<Option<KeyValue>> {
        loop {
            match self.watch_look(key, known, deadline)? {
                Look::Done(answer) => return Ok(answer),
                _ if cancelled.load(Ordering::Relaxed) => return Ok(None),
                Look::Wait(wait) => std::thread::sleep(wait.min(WATCH_POLL)),
            }
        }
    }

    /// `watch` with inotify, in the caller's runtime: each new version wakes it through the
    /// runtime's own event loop, and an idle watch wakes only every [`WATCH_NOTIFIED_RECHECK`]
    /// (a safety net) or at its deadline. No thread of its own: a thread that wakes up on a busy
    /// machine waits for a CPU, and while it waits it counts in its process's load on that
    /// CPU, which took ~15 % of the proxy's CPU weight (docs/benchmarks.md, "Proxy").
    async fn watch_notified(
        &self,
        key: &str,
        known: Option<u64>,
        deadline: Instant,
        notifier: tokio::io::unix::AsyncFd<DirNotifier>,
    ) -> DcsResult<Option<KeyValue>> {
        loop {
            let wait = match self.watch_look(key, known, deadline)? {
                Look::Done(answer) => return Ok(answer),
                Look::Wait(wait) => wait.min(WATCH_NOTIFIED_RECHECK),
            };
            match tokio::time::timeout(wait, notifier.readable()).await {
                // Time to look again.
                Err(_) => {}
                Ok(Ok(mut ready)) => {
                    // Every pending event is consumed; the look that follows sees what they
                    // announced.
                    if ready.get_inner().drain() {
                        ready.clear_ready();
                    } else {
                        tokio::time::sleep(WATCH_POLL).await;
                    }
                }
                // inotify misbehaved: behave like one polling step, never spin.
                Ok(Err(_)) => tokio::time::sleep(WATCH_POLL).await,
            }
        }
    }
}

/// What one look of `watch` found.
enum Look {
    /// The answer.
    Done(Option<KeyValue>),
    /// Nothing yet: look again within this long.
    Wait(Duration),
}

/// Wakes a waiting watch when a version is published: an inotify instance watching the store
/// directory for new names (`link` creates one; `rename` for files an operator restores).
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
        let wd = unsafe { libc::inotify_add_watch(fd.as_raw_fd(), path.as_ptr(), libc::IN_CREATE | libc::IN_MOVED_TO) };
        if wd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(DirNotifier { fd })
    }

    /// Read every pending event (the caller looks at the directory either way, so what they
    /// say does not matter): true once none is left, false if inotify misbehaved.
    fn drain(&self) -> bool {
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n > 0 {
                continue;
            }
            match std::io::Error::last_os_error().kind() {
                ErrorKind::Interrupted if n < 0 => {}
                ErrorKind::WouldBlock if n < 0 => return true,
                _ => return false,
            }
        }
    }
}

impl AsRawFd for DirNotifier {
    fn as_raw_fd(&self) -> std::os::unix::io::RawFd {
        self.fd.as_raw_fd()
    }
}

/// Other systems: no notification, `watch` polls.
#[cfg(not(target_os = "linux"))]
impl DirNotifier {
    fn new(_dir: &Path) -> std::io::Result<DirNotifier> {
        Err(ErrorKind::Unsupported.into())
    }

    fn drain(&self) -> bool {
        false
    }
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
    /// Open (creating if needed) the store in `dir`: creates the directory (mode 0700) and,
    /// for a new store, an empty first version recording this machine's identity.
    ///
    /// Fails with [`DcsError::Misconfigured`] when `dir` is on a network filesystem or the
    /// store was created on another machine, and with [`DcsError::Corrupt`] when the newest
    /// version cannot be decoded. Does blocking file I/O (once, at startup).
    pub fn open(dir: &Path) -> DcsResult<LocalStore> {
        LocalStore::open_with(dir, REMOVE_AFTER)
    }

    fn open_with(dir: &Path, remove_after: Duration) -> DcsResult<LocalStore> {
        let tmp_dir = dir.join(TMP_DIR);
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&tmp_dir)
            .map_err(|e| io_error("create directory", &tmp_dir, e))?;
        check_local_filesystem(dir)?;
        let inner = Inner {
            dir: dir.to_path_buf(),
            tmp_dir,
            machine_id: machine_identity(),
            tmp_counter: AtomicU64::new(0),
            remove_after,
            watch_cache: Mutex::default(),
        };
        inner.initialise()?;
        Ok(LocalStore { inner: Arc::new(inner) })
    }

    /// The store directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Run a read-modify-write on the blocking pool.
    async fn modify<T: Send + 'static>(
        &self,
        f: impl FnMut(&mut Data, u64) -> (T, bool) + Send + 'static,
    ) -> DcsResult<T> {
        let inner = self.inner.clone();
        blocking(move || inner.modify(f)).await
    }

    /// Run a read. Reads take no lock: a version is published complete by `link`, so a read
    /// sees exactly the state after some completed write (the link is each write's commit
    /// point), which keeps reads linearizable.
    ///
    /// A read lists the directory and parses one small file (tens of microseconds). On a
    /// single-threaded runtime (the proxy's) it runs in place: handing it to the blocking pool
    /// would cost more than the read, and a pool thread woken on a busy machine waits for a
    /// CPU while counting in the process's load there (see [`Inner::watch_notified`]).
    /// Elsewhere it runs on the blocking pool.
    async fn read<T: Send + 'static>(&self, f: impl FnOnce(&Data, u64) -> T + Send + 'static) -> DcsResult<T> {
        let inner = self.inner.clone();
        let read = move || {
            let (data, _) = inner.read_data()?;
            Ok(f(&data, now_ms()))
        };
        if tokio::runtime::Handle::current().runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread {
            return read();
        }
        blocking(read).await
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
        // Subscribe before the first look, so a write in between cannot be missed.
        let notifier = DirNotifier::new(&self.inner.dir).and_then(|n| {
            // SAFETY: a DirNotifier owns its descriptor (an OwnedFd it never replaces), so the
            // descriptor stays open and the same for as long as the AsyncFd owns it.
            unsafe { tokio::io::unix::AsyncFd::register_with_interest(n, tokio::io::Interest::READABLE) }
                .map_err(std::io::Error::from)
        });
        if let Ok(notifier) = notifier {
            return self.inner.watch_notified(key, known, deadline, notifier).await;
        }
        let cancelled = Arc::new(AtomicBool::new(false));
        // Dropping the watch future (e.g. in a `select!`) stops the polling thread within one
        // poll interval.
        let _cancel = CancelOnDrop(cancelled.clone());
        let (inner, key) = (self.inner.clone(), key.to_string());
        blocking(move || inner.watch_polling(&key, known, deadline, &cancelled)).await
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

    /// A watch parses a version for the watched keys alone: their entries come out as the whole
    /// parse gives them, the others are skipped, and what the whole parse refuses is refused.
    #[test]
    fn a_version_parsed_for_some_keys_has_them_as_the_whole_parse_does() {
        use serde::de::DeserializeSeed;
        let only = |json: &str, key: &str| {
            let mut de = serde_json::Deserializer::from_str(json);
            OnlyKeys(&[key.to_string()]).deserialize(&mut de).and_then(|d| de.end().map(|()| d))
        };
        let mut data = Data {
            revision: 9,
            machine_id: "m1".into(),
            keys: BTreeMap::new(),
            id: "w9".into(),
            parent: "w8".into(),
            computed_ms: vec![3, 2],
        };
        data.write("/c/members/a", "{\"note\":\"caf\u{e9} \\\"x\\\"\"}".as_bytes(), None, 1);
        data.write("/c/leader", b"a", Some(Duration::from_secs(10)), 1);
        data.write("/c/bin", &[0xff, 0x00], None, 1);
        data.write("/c/leaderx", b"not this one", None, 1);
        let json = serde_json::to_string_pretty(&data).unwrap();
        for key in ["/c/leader", "/c/members/a", "/c/bin", "/c/absent"] {
            let one = only(&json, key).unwrap();
            assert_eq!((one.revision, one.machine_id.as_str()), (data.revision, "m1"));
            assert_eq!(one.keys.len(), usize::from(data.keys.contains_key(key)), "{key}");
            assert_eq!(one.get(key, 2), data.get(key, 2), "{key}");
        }
        // Several keys in one parse.
        let keys = ["/c/leader".to_string(), "/c/bin".to_string(), "/c/absent".to_string()];
        let mut de = serde_json::Deserializer::from_str(&json);
        let some = OnlyKeys(&keys).deserialize(&mut de).unwrap();
        assert_eq!(some.keys.keys().collect::<Vec<_>>(), ["/c/bin", "/c/leader"]);
        for key in &keys {
            assert_eq!(some.get(key, 2), data.get(key, 2), "{key}");
        }
        // What the whole parse refuses.
        for bad in [
            "",
            "[]",
            r#"{"revision": 1, "keys": {}}"#,
            r#"{"revision": 1, "machine_id": "m1"}"#,
            r#"{"revision": 1, "machine_id": "m1", "keys": {"/c/leader": {"value": "a"}}}"#,
            r#"{"revision": 1, "machine_id": "m1", "keys": {}} trailing"#,
            r#"{"revision": 1, "machine_id": "m1", "keys": {"/c/x": [}}"#,
        ] {
            assert!(serde_json::from_str::<Data>(bad).is_err(), "{bad}");
            assert!(only(bad, "/c/leader").is_err(), "{bad}");
        }
        // Another key's entry is checked as JSON only (writes read versions whole, and refuse
        // it there).
        let other_wrong = r#"{"revision": 1, "machine_id": "m1", "keys": {"/c/x": {"value": 1}}}"#;
        assert!(serde_json::from_str::<Data>(other_wrong).is_err());
        assert!(only(other_wrong, "/c/leader").unwrap().keys.is_empty());
        assert!(only(other_wrong, "/c/x").is_err());
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

    #[test]
    fn version_names_round_trip() {
        assert_eq!(version_name(7), "store.00000000000000000007.json");
        assert_eq!(parse_version(version_name(7).as_bytes()), Some(7));
        assert_eq!(parse_version(version_name(u64::MAX).as_bytes()), Some(u64::MAX));
        for other in ["store.json", "store.lock", "store.json.tmp", "store.7.json", "store.0000000000000000000x.json"] {
            assert_eq!(parse_version(other.as_bytes()), None, "{other}");
        }
    }

    /// Two writers that read the same version: the first to publish wins, the other's link
    /// fails and it starts over on the winner's state (no lost update, no lock).
    #[test]
    fn a_writer_that_lost_the_race_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        let inner = &store.inner;
        let (mut data, read) = inner.read_data().unwrap();
        data.write("/stale", b"1", None, now_ms());
        inner.stamp(&mut data);
        let stale = inner.write_tmp(&data).unwrap();
        // Meanwhile another writer commits the next generation.
        inner.modify(|d, now| (d.write("/k", b"winner", None, now), true)).unwrap();
        assert!(matches!(inner.commit(&stale, &read, &data).unwrap(), Commit::Lost));
        assert!(!stale.exists(), "the loser's temporary file is removed");
        let (now, _) = inner.read_data().unwrap();
        assert!(now.keys.contains_key("/k") && !now.keys.contains_key("/stale"));
        // A modify whose first attempt loses runs again on the newer state.
        let mut attempts = 0;
        let rev = inner
            .modify(|d, now| {
                attempts += 1;
                if attempts == 1 {
                    // Another writer slips in between this read and its commit.
                    let other = store.inner.clone();
                    std::thread::spawn(move || other.modify(|d, now| (d.write("/other", b"1", None, now), true)))
                        .join()
                        .unwrap()
                        .unwrap();
                }
                (d.write("/k", b"second", None, now), true)
            })
            .unwrap();
        assert_eq!(attempts, 2);
        let (now, _) = inner.read_data().unwrap();
        assert!(now.keys.contains_key("/other"));
        assert_eq!(now.get("/k", now_ms()).unwrap().mod_revision, rev);
    }

    /// The version files in `dir`, oldest first.
    fn versions(dir: &Path) -> Vec<u64> {
        let mut found: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| parse_version(e.unwrap().file_name().as_encoded_bytes()))
            .collect();
        found.sort_unstable();
        found
    }

    /// Write `/k` = `i` through `inner`.
    fn put(inner: &Inner, i: usize) {
        inner.modify(|d, now| (d.write("/k", i.to_string().as_bytes(), None, now), true)).unwrap();
    }

    /// Old versions are removed as new ones are published, oldest first; the newest
    /// KEEP_VERSIONS stay. Removal waits until the version KEEP_VERSIONS - 1 after them is
    /// REMOVE_AFTER old.
    #[test]
    fn old_versions_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open_with(dir.path(), Duration::ZERO).unwrap();
        (0..40).for_each(|i| put(&store.inner, i));
        assert_eq!(versions(dir.path()), (26..=41).collect::<Vec<_>>());
        assert_eq!(std::fs::read_dir(dir.path().join(TMP_DIR)).unwrap().count(), 0, "no temporary file left");

        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open_with(dir.path(), Duration::from_millis(300)).unwrap();
        let started = Instant::now();
        (0..40).for_each(|i| put(&store.inner, i));
        let kept = versions(dir.path());
        if started.elapsed() < Duration::from_millis(300) {
            assert_eq!(kept, (1..=41).collect::<Vec<_>>(), "versions written within REMOVE_AFTER stay");
        }
        // Once they are old enough, the next write removes all that are KEEP_VERSIONS behind.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut i = 40;
        while versions(dir.path()).len() > usize::try_from(KEEP_VERSIONS).unwrap() {
            assert!(Instant::now() < deadline, "old versions never removed: {:?}", versions(dir.path()));
            std::thread::sleep(Duration::from_millis(20));
            put(&store.inner, i);
            i += 1;
        }
        let newest = *versions(dir.path()).last().unwrap();
        assert_eq!(versions(dir.path()), (newest - KEEP_VERSIONS + 1..=newest).collect::<Vec<_>>());
        // Opening the store removes what is old enough too.
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open_with(dir.path(), Duration::from_millis(300)).unwrap();
        (0..40).for_each(|i| put(&store.inner, i));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            LocalStore::open_with(dir.path(), Duration::from_millis(300)).unwrap();
            if versions(dir.path()) == (26..=41).collect::<Vec<_>>() {
                break;
            }
            assert!(Instant::now() < deadline, "open never removed old versions: {:?}", versions(dir.path()));
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A writer that read generation `g` and, with its process stalled, links `g + 1` only
    /// after `g + 1` was published and removed again (the name is free) must not report
    /// success: its write is not in the newest version. Each case runs on a store that removes
    /// versions as soon as KEEP_VERSIONS newer ones exist, which is what a long enough stall
    /// amounts to.
    #[test]
    fn a_stalled_writer_that_finds_its_name_freed_does_not_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open_with(dir.path(), Duration::ZERO).unwrap();
        let inner = &store.inner;
        let stall = |others: usize| {
            let (mut data, read) = inner.read_data().unwrap();
            data.write("/stale", b"1", None, now_ms());
            inner.stamp(&mut data);
            let tmp = inner.write_tmp(&data).unwrap();
            (0..others).for_each(|i| put(inner, i));
            assert!(!inner.version_path(read.generation + 1).exists(), "the name {} is free", read.generation + 1);
            let commit = inner.commit(&tmp, &read, &data);
            let (now, _) = inner.read_data().unwrap();
            assert!(!now.keys.contains_key("/stale"));
            commit
        };
        // 17 more writes freed the name; the version after it shows another parent.
        assert!(matches!(stall(usize::try_from(KEEP_VERSIONS).unwrap() + 1), Ok(Commit::Lost)));
        // 18 more freed the one after it as well: the outcome cannot be told, so it is an error.
        match stall(usize::try_from(KEEP_VERSIONS).unwrap() + 2) {
            Err(DcsError::Unavailable(m)) => assert!(m.contains("can no longer be told"), "{m}"),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("a write lost behind newer versions reported success"),
        }
        // Through modify, the write starts over and lands.
        put(inner, 0);
        assert!(inner.modify(|d, now| (d.write("/after", b"1", None, now), true)).is_ok());
        assert!(inner.read_data().unwrap().0.keys.contains_key("/after"));
    }

    /// A write that linked its version while the name was free, then stalled while later
    /// writes built on it and removed the version it read, still learns that it committed.
    #[test]
    fn a_stalled_writer_that_committed_learns_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open_with(dir.path(), Duration::ZERO).unwrap();
        let inner = &store.inner;
        for later in [0, 1, KEEP_VERSIONS] {
            let (mut data, read) = inner.read_data().unwrap();
            data.write("/ours", later.to_string().as_bytes(), None, now_ms());
            inner.stamp(&mut data);
            let tmp = inner.write_tmp(&data).unwrap();
            assert!(inner.link(&tmp, read.generation + 1).unwrap());
            (0..usize::try_from(later).unwrap()).for_each(|i| put(inner, i));
            if later == KEEP_VERSIONS {
                assert!(!inner.version_path(read.generation).exists(), "the version read was removed");
            }
            assert!(matches!(inner.confirm(&read, &data), Ok(Commit::Done)), "{later} later writes");
            assert_eq!(inner.read_data().unwrap().0.get("/ours", now_ms()).unwrap().text(), later.to_string());
        }
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
                let got = inner.watch_polling(key, known, deadline, &AtomicBool::new(false)).unwrap();
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

    /// A dropped polling watch stops its thread soon, instead of running until its timeout.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cancelled_watch_stops() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        let cancelled = Arc::new(AtomicBool::new(false));
        let (inner, flag) = (store.inner.clone(), cancelled.clone());
        let deadline = Instant::now() + Duration::from_secs(30);
        let t = Instant::now();
        let task = tokio::task::spawn_blocking(move || inner.watch_polling("/k", None, deadline, &flag));
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
