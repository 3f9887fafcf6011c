//! Preallocated segments: a helper thread prepares the *next* segment (header
//! plus real zeros up to `segment_size`, synced) while the committer appends
//! to the current one; a roll then only renames it into place.
//!
//! Why: `fdatasync` on a growing file must also write its size and extent
//! metadata; on a file whose blocks are already allocated and written it only
//! flushes data (measured ~400 µs vs ~220 µs per call here). Zeros are written
//! with `pwrite`, not `fallocate`: unwritten extents would still need a
//! metadata conversion on the first write into them.
//!
//! Lifecycle of `dir/spare.prep` (see the format section in `mod.rs`):
//! 1. the helper creates it, writes a segment header (fresh nonce) and zeros
//!    up to `segment_size`, `fsync`s it and the directory: it is *ready*;
//! 2. at a roll the committer renames it to `NNNNNNNN.log` and `fsync`s the
//!    directory before appending anything, so a record is never durable in a
//!    file whose name is not.
//!
//! A crash at any step leaves either a `.prep` file (ignored by scans,
//! deleted at open) or a segment that is a header followed by zeros (a
//! clean, empty segment).
//!
//! Invariants: at most one preparation runs at a time; the committer never
//! waits for it (it polls `JoinHandle::is_finished`) except when the spool
//! shuts down, where cancelling takes at most one chunk write. Preparation
//! only starts when free space is at least twice `segment_size`, so a spare
//! never eats the last space on a nearly full disk.
//! Does not append records. Its one `fsync` per spare counts in `sync_count`
//! (off the hot path, but visible); the directory syncs are not counted, as
//! for every other directory sync of the spool.
//! Errors: a failed preparation is logged (`spool.spare_failed`), its file
//! removed, and retried after `RETRY_AFTER`; the committer then keeps using
//! growing segments. A failed activation is returned to the committer, which
//! falls back to creating a segment the old way.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::committer::Shared;
use super::record::{SEG_HDR_LEN, segment_header};
use super::writer::{SegmentWriter, segment_path, sync_dir};

/// The file a spare segment is prepared in.
pub(crate) const SPARE_NAME: &str = "spare.prep";
/// Zeros are written in pieces of this size; cancellation is checked between.
const CHUNK: usize = 1 << 20;
/// Wait this long after a failed (or refused) preparation before retrying.
const RETRY_AFTER: Duration = Duration::from_secs(30);
/// A growing active segment asks for a spare once it holds this much (or
/// 1/16 of a segment if smaller): a spool that sees a few messages never
/// zero-fills 64 MiB, one under load switches to a preallocated segment
/// within a second.
const TRIGGER_MAX: u64 = 1 << 20;

/// A ready spare: synced, named `SPARE_NAME`, header written.
#[derive(Debug)]
pub(crate) struct Prepared {
    file: File,
    nonce: u64,
}

#[derive(Debug)]
enum State {
    Idle,
    Running {
        handle: JoinHandle<io::Result<Prepared>>,
        cancel: Arc<AtomicBool>,
    },
    Ready(Prepared),
    /// Do not start another preparation before this instant.
    Backoff(Instant),
}

/// The committer's handle on spare-segment preparation.
#[derive(Debug)]
pub(crate) struct Spares {
    dir: PathBuf,
    size: u64,
    state: State,
}

impl Spares {
    pub fn new(dir: &Path, segment_size: u64) -> Spares {
        Spares {
            dir: dir.to_path_buf(),
            size: segment_size,
            state: State::Idle,
        }
    }

    /// Collect a finished preparation, without blocking.
    fn poll(&mut self) {
        let finished = matches!(&self.state, State::Running { handle, .. } if handle.is_finished());
        if !finished {
            return;
        }
        let State::Running { handle, .. } = std::mem::replace(&mut self.state, State::Idle) else {
            return;
        };
        self.state = match handle.join() {
            Ok(Ok(p)) => {
                tracing::debug!(bytes = self.size, "spool.spare_ready");
                State::Ready(p)
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "spool.spare_failed");
                State::Backoff(Instant::now() + RETRY_AFTER)
            }
            Err(_) => {
                tracing::error!("spool.spare_thread_panicked");
                State::Backoff(Instant::now() + RETRY_AFTER)
            }
        };
    }

    /// Whether a spare is ready to be activated right now.
    pub fn ready(&mut self) -> bool {
        self.poll();
        matches!(self.state, State::Ready(_))
    }

    /// Take the ready spare, if any.
    pub fn take(&mut self) -> Option<Prepared> {
        self.poll();
        match std::mem::replace(&mut self.state, State::Idle) {
            State::Ready(p) => Some(p),
            other => {
                self.state = other;
                None
            }
        }
    }

    /// Called after every batch: start preparing a spare if none exists and
    /// the active segment is preallocated (steady state: the next one is
    /// prepared as soon as this one is in use) or has reached the trigger.
    pub fn maybe_start(&mut self, active: &SegmentWriter, shared: &Arc<Shared>) {
        self.poll();
        match self.state {
            State::Idle => {}
            State::Backoff(until) if Instant::now() >= until => self.state = State::Idle,
            _ => return,
        }
        if self.size <= SEG_HDR_LEN {
            return;
        }
        let trigger = TRIGGER_MAX.min(self.size / 16);
        if !active.prealloc && active.end < trigger {
            return;
        }
        let free = super::log::free_space(&self.dir).unwrap_or(0);
        if free / 2 < self.size {
            tracing::info!(
                free,
                segment_size = self.size,
                "spool.spare_skipped_low_space"
            );
            self.state = State::Backoff(Instant::now() + RETRY_AFTER);
            return;
        }
        let cancel = Arc::new(AtomicBool::new(false));
        let (dir, size, stop, sh) = (self.dir.clone(), self.size, cancel.clone(), shared.clone());
        let spawned = std::thread::Builder::new()
            .name("tern-spool-spare".into())
            .spawn(move || prepare(&dir, size, &stop, &sh));
        self.state = match spawned {
            Ok(handle) => State::Running { handle, cancel },
            Err(e) => {
                tracing::warn!(error = %e, "spool.spare_failed");
                State::Backoff(Instant::now() + RETRY_AFTER)
            }
        };
    }
}

impl Drop for Spares {
    /// Stop a running preparation (at most one chunk write away) and remove
    /// the spare file: the next open would delete it anyway.
    fn drop(&mut self) {
        let had_file = match std::mem::replace(&mut self.state, State::Idle) {
            State::Running { handle, cancel } => {
                cancel.store(true, Ordering::SeqCst);
                // A finished-but-successful run leaves its file behind.
                matches!(handle.join(), Ok(Ok(_)))
            }
            State::Ready(_) => true,
            State::Idle | State::Backoff(_) => false,
        };
        if had_file {
            let _ = std::fs::remove_file(self.dir.join(SPARE_NAME));
        }
    }
}

/// The helper thread's body: header, zeros, `fsync`, directory `fsync`.
/// On any failure (or cancellation) the partial file is removed.
fn prepare(dir: &Path, size: u64, cancel: &AtomicBool, shared: &Shared) -> io::Result<Prepared> {
    let path = dir.join(SPARE_NAME);
    let res = (|| {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        let nonce: u64 = rand::random();
        file.write_all_at(&segment_header(nonce), 0)?;
        let zeros = vec![0u8; CHUNK];
        let mut off = SEG_HDR_LEN;
        while off < size {
            if cancel.load(Ordering::SeqCst) {
                return Err(io::Error::new(io::ErrorKind::Interrupted, "spool closing"));
            }
            let n = usize::try_from(size - off).map_or(CHUNK, |r| r.min(CHUNK));
            file.write_all_at(&zeros[..n], off)?;
            off += n as u64;
        }
        shared.syncs.fetch_add(1, Ordering::Relaxed);
        // `sync_all`: the size changed, and this is not the hot path.
        file.sync_all()?;
        sync_dir(dir)?;
        Ok(Prepared { file, nonce })
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&path);
    }
    res
}

/// Rename the ready spare to segment `no` and make the name durable; the
/// returned writer appends right after the header.
pub(crate) fn activate(p: Prepared, dir: &Path, no: u32) -> io::Result<SegmentWriter> {
    let to = segment_path(dir, no);
    // `rename` would silently replace an existing segment; only the
    // committer creates segments, so checking first is enough.
    if to.exists() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists", to.display()),
        ));
    }
    std::fs::rename(dir.join(SPARE_NAME), &to)?;
    if let Err(e) = sync_dir(dir) {
        // The name may not be durable: never append to it. Removing it lets
        // the fallback create the same number.
        let _ = std::fs::remove_file(&to);
        return Err(e);
    }
    Ok(SegmentWriter {
        no,
        nonce: p.nonce,
        file: p.file,
        end: SEG_HDR_LEN,
        poisoned: false,
        sealed: false,
        prealloc: true,
    })
}

/// Remove spare files left by a crash (called at open, before the committer
/// starts). Returns how many were removed.
pub(crate) fn remove_stale(dir: &Path) -> io::Result<usize> {
    let mut n = 0;
    for ent in std::fs::read_dir(dir)? {
        let ent = ent?;
        let name = ent.file_name();
        if name.to_str().is_some_and(|s| s.ends_with(".prep")) {
            std::fs::remove_file(ent.path())?;
            n += 1;
        }
    }
    if n > 0 {
        sync_dir(dir)?;
    }
    Ok(n)
}
