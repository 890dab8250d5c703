//! Releases the shared memory killed postmasters leave behind. postgres removes its System V
//! segment and its dynamic shared memory (`/dev/shm/PostgreSQL.*`) when it stops, and those of
//! a crashed predecessor when it starts again on the same data directory (unless that one's
//! orphaned backends are still attached then: it takes a new segment and the old one stays).
//! A postmaster that a test SIGKILLs and never restarts leaves both behind. On a long-lived
//! development machine the System V segments would pile up to the kernel's limit (`shmmni`,
//! 4096), after which no postgres starts. [`release_leftovers`] does what postgres' start-up
//! does (`dsm_cleanup_using_control_segment`, then the removal of the old segment) for every
//! segment of one data directory that nobody is attached to: postgres' header in each
//! segment names the data directory (device and inode), so no other cluster's is touched.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// `PGShmemMagic` (storage/pg_shmem.h): the first field of the System V segment's header.
const SHMEM_MAGIC: i32 = 679_834_894;
/// `PGShmemHeader` on 64-bit Linux: magic (i32), creatorPID (i32), totalsize, freeoffset
/// (usize each), dsm_control (u32, padded), index (a pointer), device (dev_t), inode (ino_t).
const DSM_CONTROL_OFFSET: usize = 24;
const DEVICE_OFFSET: usize = 40;
const INODE_OFFSET: usize = 48;
const HEADER_SIZE: u64 = 56;
/// `PG_DYNSHMEM_CONTROL_MAGIC` (storage/dsm.c).
const DSM_CONTROL_MAGIC: u32 = 0x9a50_3d32;
/// `dsm_control_header`: magic, nitems, maxitems (u32 each), then the items at 8-byte
/// alignment; each `dsm_control_item` is handle, refcnt (u32), first_page, npages (usize),
/// a pointer and a bool: 40 bytes.
const DSM_ITEMS_OFFSET: usize = 16;
const DSM_ITEM_SIZE: usize = 40;

/// A System V segment of postgres' whose header names the data directory with `dev`/`ino`.
struct Segment {
    shmid: i32,
    creator: i32,
    attached: u64,
    dsm_control: u32,
}

/// The shared memory of the postmaster running on `data_dir`: its System V segment id, and
/// the file of its dynamic shared memory control segment. For tests of this module.
pub fn shared_memory(data_dir: &Path) -> Option<(i32, Option<PathBuf>)> {
    let s = segments_of(&[data_dir.to_path_buf()]).into_iter().find(|s| pgkeel_pg::process::alive(s.creator))?;
    Some((s.shmid, (s.dsm_control != 0).then(|| dsm_path(s.dsm_control))))
}

/// Whether System V segment `shmid` exists.
pub fn segment_exists(shmid: i32) -> bool {
    // SAFETY: shmid_ds is plain data; IPC_STAT fills it or fails.
    let mut ds: libc::shmid_ds = unsafe { std::mem::zeroed() };
    unsafe { libc::shmctl(shmid, libc::IPC_STAT, &mut ds) == 0 }
}

fn dsm_path(handle: u32) -> PathBuf {
    Path::new("/dev/shm").join(format!("PostgreSQL.{handle}"))
}

/// Releases every System V segment of the postmasters of `data_dirs` (a data directory moved
/// aside keeps its identity, so `data.old` counts) that nobody is attached to, with the
/// dynamic shared memory its control segment lists. Call it after the cluster's processes
/// were killed (a postmaster just SIGKILLed, and its backends, take a moment to detach: it
/// waits for that, at most a few seconds) and before the directories are removed. Returns
/// how many objects it removed.
pub fn release_leftovers(data_dirs: &[PathBuf]) -> usize {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut segments = segments_of(data_dirs);
    while segments.iter().any(|s| s.attached > 0) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        segments = segments_of(data_dirs);
    }
    let mut removed = 0;
    for s in segments.iter().filter(|s| s.attached == 0) {
        if s.dsm_control != 0 {
            removed += remove_dynamic_segments(s.dsm_control);
        }
        // SAFETY: IPC_RMID with no buffer, on a segment of this data directory nobody uses.
        if unsafe { libc::shmctl(s.shmid, libc::IPC_RMID, std::ptr::null_mut()) } == 0 {
            removed += 1;
        }
    }
    removed
}

/// postgres' System V segments whose header names one of `data_dirs`, from
/// `/proc/sysvipc/shm`.
fn segments_of(data_dirs: &[PathBuf]) -> Vec<Segment> {
    let dirs: Vec<(u64, u64)> =
        data_dirs.iter().filter_map(|d| std::fs::metadata(d).ok()).map(|m| (m.dev(), m.ino())).collect();
    if dirs.is_empty() {
        return Vec::new();
    }
    let Ok(table) = std::fs::read_to_string("/proc/sysvipc/shm") else { return Vec::new() };
    let mut found = Vec::new();
    for line in table.lines().skip(1) {
        // key shmid perms size cpid lpid nattch ...
        let f: Vec<&str> = line.split_whitespace().collect();
        let number = |i: usize| f.get(i).and_then(|v| v.parse::<i64>().ok());
        let (Some(shmid), Some(size), Some(cpid), Some(nattch)) = (number(1), number(3), number(4), number(6)) else {
            continue;
        };
        if (size as u64) < HEADER_SIZE {
            continue;
        }
        let Some((device, inode, dsm_control)) = header(shmid as i32) else { continue };
        if dirs.contains(&(device, inode)) {
            found.push(Segment { shmid: shmid as i32, creator: cpid as i32, attached: nattch as u64, dsm_control });
        }
    }
    found
}

/// The data directory's device and inode and the dynamic shared memory control handle in the
/// header of segment `shmid`, when the header is postgres'.
fn header(shmid: i32) -> Option<(u64, u64, u32)> {
    // SAFETY: a read-only attachment of a segment of at least HEADER_SIZE bytes (checked by
    // the caller), read within them, detached after.
    unsafe {
        let at = libc::shmat(shmid, std::ptr::null(), libc::SHM_RDONLY);
        if at as isize == -1 {
            return None;
        }
        let base = at as *const u8;
        let magic = std::ptr::read_unaligned(base as *const i32);
        let handle = std::ptr::read_unaligned(base.add(DSM_CONTROL_OFFSET) as *const u32);
        let device = std::ptr::read_unaligned(base.add(DEVICE_OFFSET) as *const u64);
        let inode = std::ptr::read_unaligned(base.add(INODE_OFFSET) as *const u64);
        libc::shmdt(at);
        (magic == SHMEM_MAGIC).then_some((device, inode, handle))
    }
}

/// Removes the segments the control segment `control` lists as in use (not those in the main
/// shared memory area: odd handles), then the control segment; returns how many it removed.
fn remove_dynamic_segments(control: u32) -> usize {
    let Ok(bytes) = std::fs::read(dsm_path(control)) else { return 0 };
    let u32_at = |at: usize| bytes.get(at..at + 4).map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
    if u32_at(0) != Some(DSM_CONTROL_MAGIC) {
        return 0;
    }
    let nitems = u32_at(4).unwrap_or(0) as usize;
    let mut removed = 0;
    for i in 0..nitems {
        let at = DSM_ITEMS_OFFSET + i * DSM_ITEM_SIZE;
        let (Some(handle), Some(refcnt)) = (u32_at(at), u32_at(at + 4)) else { break };
        if refcnt != 0 && handle & 1 == 0 && std::fs::remove_file(dsm_path(handle)).is_ok() {
            removed += 1;
        }
    }
    if std::fs::remove_file(dsm_path(control)).is_ok() {
        removed += 1;
    }
    removed
}
