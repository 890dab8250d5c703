//! Where the repository's objects live.
//!
//! [`Storage`] is a small object-store-like interface: keys are `/`-separated relative paths,
//! every write is atomic (a reader sees the old object, or no object, or the whole new one,
//! never a part) and durable when it returns. [`LocalStorage`] implements it on a local (or
//! mounted) directory, [`crate::s3::S3Storage`] on an S3-compatible bucket (a multipart
//! upload completed by `commit`, `If-None-Match: *` for [`WriteMode::NoClobber`]).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// How a write treats an object that already exists under the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// Replace it (atomically).
    Overwrite,
    /// Leave it alone and report [`WriteOutcome::Exists`] (atomic test-and-set: two writers
    /// racing for the same key cannot both win).
    NoClobber,
}

/// What a committed write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// The object is stored.
    Written,
    /// [`WriteMode::NoClobber`] and the key was taken: nothing was written.
    Exists,
}

/// A write in progress: bytes go to a temporary object that becomes visible under its key
/// only on [`ObjectWriter::commit`]. Dropping it without committing leaves nothing behind.
pub trait ObjectWriter: Write + Send {
    /// Makes the object durable and visible under its key.
    fn commit(self: Box<Self>, mode: WriteMode) -> io::Result<WriteOutcome>;
}

/// An object store the repository lives in. Keys are relative, `/`-separated, without `.`
/// or `..` components.
pub trait Storage: Send + Sync {
    /// Human-readable location, for messages (e.g. the directory path).
    fn describe(&self) -> String;
    /// Whether the storage itself is there (the repository root exists).
    fn check(&self) -> io::Result<()>;
    /// Opens an object for reading; `None` when it does not exist.
    fn open(&self, key: &str) -> io::Result<Option<Box<dyn Read + Send>>>;
    /// Starts writing an object (see [`ObjectWriter`]).
    fn create(&self, key: &str) -> io::Result<Box<dyn ObjectWriter>>;
    /// Names of the direct children of `prefix` (a "directory" key; `""` is the root):
    /// objects and sub-prefixes alike, sorted. Empty when the prefix does not exist.
    fn list(&self, prefix: &str) -> io::Result<Vec<String>>;
    /// Whether an object exists.
    fn exists(&self, key: &str) -> io::Result<bool>;
    /// Every object below `prefix` (`""` for all), at any depth, sorted by key: full keys,
    /// sizes and modification times.
    fn list_tree(&self, prefix: &str) -> io::Result<Vec<ObjectInfo>>;
    /// Deletes an object; one that does not exist is not an error.
    fn delete(&self, key: &str) -> io::Result<()>;
    /// Deletes every object below `prefix` (a "directory" key, not `""`); returns how many.
    fn delete_tree(&self, prefix: &str) -> io::Result<usize>;

    /// Deletes several objects (absent ones are not an error).
    fn delete_keys(&self, keys: &[String]) -> io::Result<()> {
        keys.iter().try_for_each(|k| self.delete(k))
    }

    /// Reads a whole object; `None` when it does not exist.
    fn read(&self, key: &str) -> io::Result<Option<Vec<u8>>> {
        match self.open(key)? {
            None => Ok(None),
            Some(mut r) => {
                let mut buf = Vec::new();
                r.read_to_end(&mut buf)?;
                Ok(Some(buf))
            }
        }
    }

    /// Writes a whole object atomically and durably.
    fn write(&self, key: &str, data: &[u8], mode: WriteMode) -> io::Result<WriteOutcome> {
        let mut w = self.create(key)?;
        w.write_all(data)?;
        w.commit(mode)
    }
}

/// An object found by [`Storage::list_tree`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Its full key.
    pub key: String,
    /// Its size in bytes.
    pub size: u64,
    /// When it was last written, in microseconds since the epoch.
    pub modified_us: i64,
}

/// Checks a key: relative, `/`-separated, no empty, `.` or `..` components.
pub fn check_key(key: &str) -> io::Result<()> {
    let bad = key.is_empty()
        || key.starts_with('/')
        || key.contains('\0')
        || key.split('/').any(|c| c.is_empty() || c == "." || c == "..");
    if bad {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("invalid repository key {key:?}")));
    }
    Ok(())
}

/// A repository on a local or mounted file system.
///
/// Writes go to a temporary file in the destination directory, which is fsynced, then
/// renamed (or hard-linked, for [`WriteMode::NoClobber`]) into place, then the directory is
/// fsynced. Directories are created 0700 and files 0600. When this process is root, every
/// directory and file it creates is given to the owner of the repository root, so that
/// `pgkeel wal push` run by postgres (as the `postgres` OS user) and `pgkeel backup` run by
/// root can share one repository.
#[derive(Debug, Clone)]
pub struct LocalStorage {
    root: PathBuf,
}

impl LocalStorage {
    /// A storage rooted at `root` (which must exist when used).
    pub fn new(root: impl Into<PathBuf>) -> LocalStorage {
        let root = root.into();
        let root = std::path::absolute(&root).unwrap_or(root);
        LocalStorage { root }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> io::Result<PathBuf> {
        check_key(key)?;
        Ok(self.root.join(key))
    }

    /// The owner to give new entries: the repository root's, when we are root and it is not.
    fn owner(&self) -> Option<(u32, u32)> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return None;
        }
        let m = fs::metadata(&self.root).ok()?;
        (m.uid() != 0).then_some((m.uid(), m.gid()))
    }

    fn give(&self, path: &Path) -> io::Result<()> {
        match self.owner() {
            Some((uid, gid)) => std::os::unix::fs::chown(path, Some(uid), Some(gid)),
            None => Ok(()),
        }
    }

    /// Creates `dir` and its missing parents below the root (0700, owned like the root),
    /// fsyncing each parent that got a new entry.
    fn ensure_dir(&self, dir: &Path) -> io::Result<()> {
        if dir.is_dir() {
            return Ok(());
        }
        let rel = dir.strip_prefix(&self.root).map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("{} is outside the repository", dir.display()))
        })?;
        let mut cur = self.root.clone();
        for comp in rel.components() {
            let parent = cur.clone();
            cur.push(comp);
            match fs::DirBuilder::new().mode(0o700).create(&cur) {
                Ok(()) => {
                    self.give(&cur)?;
                    sync_dir(&parent)?;
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && cur.is_dir() => {}
                Err(e) => return Err(io::Error::new(e.kind(), format!("creating {}: {e}", cur.display()))),
            }
        }
        Ok(())
    }
}

impl Storage for LocalStorage {
    fn describe(&self) -> String {
        self.root.display().to_string()
    }

    fn check(&self) -> io::Result<()> {
        match fs::metadata(&self.root) {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(_) => Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                format!("repository {} is not a directory", self.root.display()),
            )),
            Err(e) => Err(io::Error::new(
                e.kind(),
                format!(
                    "repository {}: {e} (create it, owned by the user postgres runs as: mkdir -p DIR && chown \
                     postgres: DIR)",
                    self.root.display()
                ),
            )),
        }
    }

    fn open(&self, key: &str) -> io::Result<Option<Box<dyn Read + Send>>> {
        let path = self.path(key)?;
        match File::open(&path) {
            Ok(f) => Ok(Some(Box::new(f))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io::Error::new(e.kind(), format!("opening {}: {e}", path.display()))),
        }
    }

    fn create(&self, key: &str) -> io::Result<Box<dyn ObjectWriter>> {
        let path = self.path(key)?;
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_else(|| self.root.clone());
        self.ensure_dir(&dir)?;
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let (tmp, file) = temp_file(&dir, &name)?;
        self.give(&tmp)?;
        Ok(Box::new(LocalWriter { file: Some(file), tmp, path, dir }))
    }

    fn list(&self, prefix: &str) -> io::Result<Vec<String>> {
        let dir = if prefix.is_empty() { self.root.clone() } else { self.path(prefix)? };
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io::Error::new(e.kind(), format!("listing {}: {e}", dir.display()))),
        };
        let mut names = Vec::new();
        for entry in entries {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if !is_temp_name(&name) {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    fn exists(&self, key: &str) -> io::Result<bool> {
        let path = self.path(key)?;
        match fs::symlink_metadata(&path) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io::Error::new(e.kind(), format!("checking {}: {e}", path.display()))),
        }
    }

    fn list_tree(&self, prefix: &str) -> io::Result<Vec<ObjectInfo>> {
        let start = if prefix.is_empty() { self.root.clone() } else { self.path(prefix)? };
        let mut out = Vec::new();
        let mut stack = vec![(start, prefix.to_string())];
        while let Some((dir, key)) = stack.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) if e.kind() == io::ErrorKind::NotADirectory => {
                    // `prefix` names an object, not a directory: nothing below it.
                    continue;
                }
                Err(e) => return Err(io::Error::new(e.kind(), format!("listing {}: {e}", dir.display()))),
            };
            for entry in entries {
                let entry = entry?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if is_temp_name(&name) {
                    continue;
                }
                let child = if key.is_empty() { name } else { format!("{key}/{name}") };
                let meta = match fs::symlink_metadata(entry.path()) {
                    Ok(m) => m,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(io::Error::new(e.kind(), format!("reading {}: {e}", entry.path().display()))),
                };
                if meta.is_dir() {
                    stack.push((entry.path(), child));
                } else {
                    let modified_us = meta.mtime() * 1_000_000 + meta.mtime_nsec() / 1000;
                    out.push(ObjectInfo { key: child, size: meta.len(), modified_us });
                }
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn delete(&self, key: &str) -> io::Result<()> {
        let path = self.path(key)?;
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io::Error::new(e.kind(), format!("deleting {}: {e}", path.display()))),
        }
        match path.parent() {
            Some(dir) => sync_dir(dir).map_err(|e| io::Error::new(e.kind(), format!("fsync {}: {e}", dir.display()))),
            None => Ok(()),
        }
    }

    fn delete_tree(&self, prefix: &str) -> io::Result<usize> {
        let path = self.path(prefix)?;
        let n = self.list_tree(prefix)?.len();
        match fs::remove_dir_all(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io::Error::new(e.kind(), format!("deleting {}: {e}", path.display()))),
        }
        if let Some(dir) = path.parent() {
            sync_dir(dir).map_err(|e| io::Error::new(e.kind(), format!("fsync {}: {e}", dir.display())))?;
        }
        Ok(n)
    }
}

struct LocalWriter {
    file: Option<File>,
    tmp: PathBuf,
    path: PathBuf,
    dir: PathBuf,
}

impl Write for LocalWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.file {
            Some(f) => f.write(buf),
            None => Err(io::Error::other("write after commit")),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.file {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

impl ObjectWriter for LocalWriter {
    fn commit(mut self: Box<Self>, mode: WriteMode) -> io::Result<WriteOutcome> {
        let ctx = |what: &str, p: &Path, e: io::Error| io::Error::new(e.kind(), format!("{what} {}: {e}", p.display()));
        if let Some(f) = self.file.take() {
            f.sync_all().map_err(|e| ctx("fsync", &self.tmp, e))?;
        }
        let outcome = match mode {
            WriteMode::Overwrite => {
                fs::rename(&self.tmp, &self.path).map_err(|e| ctx("renaming into place", &self.path, e))?;
                WriteOutcome::Written
            }
            WriteMode::NoClobber => {
                // link(2) fails with EEXIST instead of replacing: an atomic "create if absent".
                let r = match fs::hard_link(&self.tmp, &self.path) {
                    Ok(()) => WriteOutcome::Written,
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => WriteOutcome::Exists,
                    Err(e) => return Err(ctx("linking into place", &self.path, e)),
                };
                let _ = fs::remove_file(&self.tmp);
                r
            }
        };
        sync_dir(&self.dir).map_err(|e| ctx("fsync directory", &self.dir, e))?;
        Ok(outcome)
    }
}

impl Drop for LocalWriter {
    fn drop(&mut self) {
        // Uncommitted (or the NoClobber link already done): the temp file must go.
        let _ = fs::remove_file(&self.tmp);
    }
}

/// Suffix of temporary files; [`LocalStorage::list`] hides them.
const TEMP_SUFFIX: &str = ".pgkeel-tmp";

fn is_temp_name(name: &str) -> bool {
    name.starts_with('.') && name.ends_with(TEMP_SUFFIX)
}

/// Creates a new temporary file `.NAME.PID.N.pgkeel-tmp` in `dir` (mode 0600).
pub(crate) fn temp_file(dir: &Path, name: &str) -> io::Result<(PathBuf, File)> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!(".{name}.{}.{n}{TEMP_SUFFIX}", std::process::id()));
        match OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp) {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io::Error::new(e.kind(), format!("creating a file in {}: {e}", dir.display()))),
        }
    }
}

/// fsyncs a directory (makes renames and new entries in it durable).
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_checked() {
        for bad in ["", "/a", "a//b", "a/../b", "..", "./a", "a/", "a\0b"] {
            assert!(check_key(bad).is_err(), "{bad:?}");
        }
        for good in ["a", "a/b.zst", "c/wal/0000000100000000/000000010000000000000001.zst"] {
            check_key(good).unwrap();
        }
    }

    #[test]
    fn write_read_list_and_no_clobber() {
        let tmp = tempfile::tempdir().unwrap();
        let s = LocalStorage::new(tmp.path());
        s.check().unwrap();
        assert!(s.read("x/y/z").unwrap().is_none());
        assert_eq!(s.write("x/y/z", b"one", WriteMode::NoClobber).unwrap(), WriteOutcome::Written);
        assert_eq!(s.write("x/y/z", b"two", WriteMode::NoClobber).unwrap(), WriteOutcome::Exists);
        assert_eq!(s.read("x/y/z").unwrap().unwrap(), b"one");
        assert_eq!(s.write("x/y/z", b"three", WriteMode::Overwrite).unwrap(), WriteOutcome::Written);
        assert_eq!(s.read("x/y/z").unwrap().unwrap(), b"three");
        s.write("x/a", b"", WriteMode::Overwrite).unwrap();
        assert_eq!(s.list("x").unwrap(), vec!["a".to_string(), "y".to_string()]);
        assert_eq!(s.list("nope").unwrap(), Vec::<String>::new());
        assert!(s.exists("x/a").unwrap());
        // No temp files are left behind, and an abandoned write leaves nothing.
        let mut w = s.create("x/abandoned").unwrap();
        w.write_all(b"partial").unwrap();
        drop(w);
        let names: Vec<_> = fs::read_dir(tmp.path().join("x")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(!s.exists("x/abandoned").unwrap());
    }

    #[test]
    fn missing_root_is_explained() {
        let tmp = tempfile::tempdir().unwrap();
        let err = LocalStorage::new(tmp.path().join("missing")).check().unwrap_err().to_string();
        assert!(err.contains("missing") && err.contains("chown"), "{err}");
    }
}
