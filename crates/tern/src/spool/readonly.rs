//! Read-only access for `tern queue list/show` while the daemon may be
//! running: scan the segments and read a body, never modifying anything.
//!
//! The daemon's compaction may delete a segment at any moment. By the
//! deletion rules (`compact.rs`) a deleted segment held nothing live, and
//! everything it held that still mattered was synced into a newer segment
//! first. So:
//! - a segment listed but gone when read (`NotFound`) is skipped;
//! - the scan is repeated (a few times at most) until the list of segments
//!   is the same before and after it: a copy made into a segment created
//!   after the listing is then never missed. Segment numbers only grow, so an
//!   unchanged list means nothing was created or deleted meanwhile;
//! - reading a body whose segment vanished after the scan scans again.
//!
//! Only `NNNNNNNN.log` files are segments: `*.prep` spares (and anything
//! else in the directory) are never read. A torn tail or damaged region is
//! skipped, as recovery would (the running daemon may be appending).
//!
//! Errors: `SpoolError::Io` when the directory or a segment cannot be read
//! (other than vanishing), `SpoolError::NotFound` for an unknown or finished
//! message, `SpoolError::Corrupt` when the record does not verify.

use std::io;
use std::path::Path;

use super::index::Index;
use super::log::read_msg_body;
use super::recover::{Scanner, list_segments};
use super::writer::segment_path;
use super::{Envelope, MsgId, SpoolError};

/// How many times a scan or read is repeated while segments keep changing
/// under it; the last result is used after that.
const ATTEMPTS: usize = 4;

/// Read-only scan for `tern queue list/show` while the daemon may run: never
/// modifies anything, ignores a torn tail and damaged regions.
pub fn scan_read_only(dir: &Path) -> Result<Vec<(MsgId, Envelope)>, SpoolError> {
    Ok(scan_index(dir, &mut |_| {})?.live())
}

/// Read one body without opening the spool for writing.
pub fn read_body_read_only(dir: &Path, id: MsgId) -> Result<Vec<u8>, SpoolError> {
    read_body(dir, id, &mut |_| {})
}

/// The index of `dir`. `before_read` runs before each segment is read (tests
/// use it to act as a concurrent compaction).
pub(crate) fn scan_index(
    dir: &Path,
    before_read: &mut dyn FnMut(u32),
) -> Result<Index, SpoolError> {
    let mut last = Index::default();
    for _ in 0..ATTEMPTS {
        let listed = list_segments(dir)?;
        let mut scanner = Scanner::default();
        for &no in &listed {
            before_read(no);
            match std::fs::read(segment_path(dir, no)) {
                Ok(buf) => scanner.segment(no, &buf),
                // Deleted by compaction since the listing: it held nothing
                // live, and its copies are in a newer segment.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    tracing::debug!(segment = no, "spool.read_only_segment_gone");
                }
                Err(e) => return Err(e.into()),
            }
        }
        last = scanner.finish().index;
        if list_segments(dir)? == listed {
            break;
        }
    }
    Ok(last)
}

/// `read_body_read_only`, with the test hook of `scan_index`; `before_read`
/// also runs (with the segment number) just before the body is read.
pub(crate) fn read_body(
    dir: &Path,
    id: MsgId,
    before_read: &mut dyn FnMut(u32),
) -> Result<Vec<u8>, SpoolError> {
    let mut gone = None;
    for _ in 0..ATTEMPTS {
        let index = scan_index(dir, before_read)?;
        let (loc, nonce) = index.locate(id).ok_or(SpoolError::NotFound(id))?;
        before_read(loc.seg);
        match read_msg_body(&segment_path(dir, loc.seg), loc, nonce) {
            // Compaction moved the message and deleted the segment since
            // the scan: scan again.
            Err(SpoolError::Io(e)) if e.kind() == io::ErrorKind::NotFound => gone = Some(e),
            res => return res,
        }
    }
    Err(gone.map_or(SpoolError::NotFound(id), SpoolError::Io))
}
