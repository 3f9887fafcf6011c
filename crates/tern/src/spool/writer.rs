//! Appending to a segment: the batch write, the one `fdatasync`, the
//! truncate-back on failure, and the fault-injection hook used by tests.
//!
//! Invariants: `SegmentWriter::end` is always the end of the last record that
//! was durably synced (the logical end; a preallocated file is longer and
//! holds only zeros after it); after a failed batch the file is cut back to it
//! (`set_len`), and if even that fails the writer is marked `poisoned` so the
//! next batch starts a fresh segment instead of appending after garbage.
//! Does not decide what to write or update the index (the committer does).
//! Errors: `std::io::Error` from write, sync or scratch reads, returned as-is.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use super::draft::Body;
use super::index::Loc;
use super::record::{Kind, REC_HDR_LEN, REC_OVERHEAD, crc_seed, record_header, segment_header};
use super::{Envelope, MsgId, RcptStatus};

/// Flush the batch buffer to the file once it holds this much (large bodies
/// streamed from scratch files are written in pieces of about this size).
const FLUSH_AT: usize = 4 << 20;

/// Test and fault-drill hook: make the next N segment writes or syncs fail.
/// Failed writes first write half of their bytes, like a disk that fills up
/// mid-write; they report `ENOSPC`, failed syncs report `EIO`.
#[derive(Debug, Default)]
pub struct Faults {
    writes: AtomicU32,
    syncs: AtomicU32,
}

impl Faults {
    pub const fn none() -> Faults {
        Faults {
            writes: AtomicU32::new(0),
            syncs: AtomicU32::new(0),
        }
    }

    pub fn fail_writes(&self, n: u32) {
        self.writes.store(n, Ordering::SeqCst);
    }

    pub fn fail_syncs(&self, n: u32) {
        self.syncs.store(n, Ordering::SeqCst);
    }

    fn take(a: &AtomicU32) -> bool {
        a.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
            .is_ok()
    }
}

pub(crate) fn segment_path(dir: &Path, no: u32) -> PathBuf {
    dir.join(format!("{no:08}.log"))
}

/// fsync a directory so a created, renamed or removed entry is durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The open active segment.
#[derive(Debug)]
pub(crate) struct SegmentWriter {
    pub no: u32,
    pub nonce: u64,
    pub file: File,
    /// The logical end: just past the last durably synced record. In a
    /// preallocated segment the file is longer, and zeros follow.
    pub end: u64,
    pub poisoned: bool,
    /// The file already has its full size (zero-filled), so appends below
    /// that size change no file metadata and `fdatasync` flushes data only.
    pub prealloc: bool,
}

impl SegmentWriter {
    /// Create segment `no` with its header synced, then sync the directory
    /// so the new name survives a crash. The fallback when no prepared
    /// segment is ready (`spare.rs`): this file grows with every batch.
    pub fn create(dir: &Path, no: u32, syncs: &AtomicU64) -> io::Result<SegmentWriter> {
        let nonce: u64 = rand::random();
        let path = segment_path(dir, no);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        let hdr = segment_header(nonce);
        file.write_all_at(&hdr, 0)?;
        syncs.fetch_add(1, Ordering::Relaxed);
        file.sync_data()?;
        sync_dir(dir)?;
        Ok(SegmentWriter {
            no,
            nonce,
            file,
            end: hdr.len() as u64,
            poisoned: false,
            prealloc: false,
        })
    }

    /// Reopen the last segment at recovery; appends continue at `end`.
    pub fn open_existing(
        dir: &Path,
        no: u32,
        nonce: u64,
        end: u64,
        prealloc: bool,
    ) -> io::Result<SegmentWriter> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(segment_path(dir, no))?;
        Ok(SegmentWriter {
            no,
            nonce,
            file,
            end,
            poisoned: false,
            prealloc,
        })
    }

    fn write_at(&self, buf: &[u8], off: u64, faults: &Faults) -> io::Result<()> {
        if Faults::take(&faults.writes) {
            let _ = self.file.write_all_at(&buf[..buf.len() / 2], off);
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        self.file.write_all_at(buf, off)
    }

    fn sync(&self, faults: &Faults, syncs: &AtomicU64) -> io::Result<()> {
        syncs.fetch_add(1, Ordering::Relaxed);
        if Faults::take(&faults.syncs) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.file.sync_data()
    }
}

/// What the index does with a record once it is durable.
#[derive(Debug)]
pub(crate) enum Apply {
    Msg(Envelope),
    State(Vec<(usize, RcptStatus)>),
    Done,
}

/// One record of a batch: payload prefix in memory, optional body after it.
#[derive(Debug)]
pub(crate) struct OutRec {
    pub id: MsgId,
    pub kind: Kind,
    pub head: Vec<u8>,
    pub body: Option<Body>,
    pub apply: Apply,
    /// Filled in by `append_batch`.
    pub loc: Loc,
}

impl OutRec {
    pub fn total(&self) -> u64 {
        (REC_OVERHEAD + self.head.len()) as u64 + self.body.as_ref().map_or(0, Body::len)
    }
}

/// Append `recs` at the writer's end and `fdatasync` once. On any error the
/// file is cut back to where the batch started and nothing of it counts.
pub(crate) fn append_batch(
    w: &mut SegmentWriter,
    recs: &mut [OutRec],
    faults: &Faults,
    syncs: &AtomicU64,
) -> io::Result<()> {
    let start = w.end;
    let res = write_records(w, recs, faults).and_then(|end| w.sync(faults, syncs).map(|()| end));
    match res {
        Ok(end) => {
            w.end = end;
            Ok(())
        }
        Err(e) => {
            // Cutting back also drops a preallocated segment's zero tail:
            // nothing is lost, the segment is never appended to again
            // (poisoned below), and a short file has an unambiguous end.
            if let Err(t) = w.file.set_len(start) {
                tracing::error!(segment = w.no, error = %t, "spool.truncate_failed");
            }
            // Never append to this file again: after a failed fdatasync the
            // kernel may have dropped the dirty pages it could not write, so
            // later syncs of the same file prove nothing (the "fsyncgate"
            // lesson). Rolling also lets a full disk recover: the old
            // segment, once all its messages are done, is deleted, which
            // it never would be while it stayed the active one.
            w.poisoned = true;
            Err(e)
        }
    }
}

/// Encode and write every record; returns the new end offset.
fn write_records(w: &SegmentWriter, recs: &mut [OutRec], faults: &Faults) -> io::Result<u64> {
    let mut buf: Vec<u8> = Vec::with_capacity(
        recs.iter()
            .map(|r| r.total() as usize)
            .sum::<usize>()
            .min(FLUSH_AT * 2),
    );
    let mut off = w.end;
    let seed = crc_seed(w.nonce);
    for r in recs.iter_mut() {
        let body_len = r.body.as_ref().map_or(0, Body::len);
        let plen = u32::try_from(r.head.len() as u64 + body_len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "record larger than 4 GiB"))?;
        let rec_off = off + buf.len() as u64;
        let hdr = record_header(r.kind, plen);
        let mut crc = crc32c::crc32c_append(seed, &hdr);
        crc = crc32c::crc32c_append(crc, &r.head);
        buf.extend_from_slice(&hdr);
        buf.extend_from_slice(&r.head);
        match &r.body {
            None => {}
            Some(Body::Mem(v)) => {
                crc = crc32c::crc32c_append(crc, v);
                buf.extend_from_slice(v);
            }
            Some(Body::File(s)) => {
                let mut pos = 0u64;
                let mut chunk = vec![0u8; FLUSH_AT.min(s.len as usize).max(1)];
                while pos < s.len {
                    let n = chunk.len().min((s.len - pos) as usize);
                    s.file.read_exact_at(&mut chunk[..n], pos)?;
                    crc = crc32c::crc32c_append(crc, &chunk[..n]);
                    buf.extend_from_slice(&chunk[..n]);
                    pos += n as u64;
                    if buf.len() >= FLUSH_AT {
                        w.write_at(&buf, off, faults)?;
                        off += buf.len() as u64;
                        buf.clear();
                    }
                }
            }
        }
        buf.extend_from_slice(&crc.to_le_bytes());
        r.loc = Loc {
            seg: w.no,
            off: rec_off,
            len: r.total(),
            body_off: (REC_HDR_LEN + r.head.len()) as u64,
            body_len,
        };
        if buf.len() >= FLUSH_AT {
            w.write_at(&buf, off, faults)?;
            off += buf.len() as u64;
            buf.clear();
        }
    }
    if !buf.is_empty() {
        w.write_at(&buf, off, faults)?;
        off += buf.len() as u64;
    }
    Ok(off)
}
