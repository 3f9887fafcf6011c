//! Appending to a segment: the batch write, the one `fdatasync`, the
//! truncate-back on failure, and the fault-injection hook used by tests.
//!
//! Invariants: `SegmentWriter::end` is always the end of the last record that
//! was durably synced (the logical end; a preallocated file is longer and
//! holds only zeros after it). After a failed batch the writer is `poisoned`
//! (never appended to again: the next batch starts a fresh segment) and
//! *sealed*: the file is cut back to its logical end and the cut is synced,
//! so no record of the failed batch can reappear at recovery. A seal that
//! fails is retried before the next batch may commit anywhere (`Log`).
//! A record that fails on its own (its scratch file cannot be read, its
//! payload does not fit the 32-bit length) is left out of the batch: what was
//! flushed of it is overwritten by the next record or cleared (zeros in a
//! preallocated segment, a truncation otherwise) before the sync, and only
//! that record is marked `failed`; the rest of the batch is written as usual.
//! Does not decide what to write or update the index (the committer does).
//! Errors: `std::io::Error` from a segment write or sync fails the batch;
//! per-record errors are reported in `OutRec::failed`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use super::draft::Body;
use super::index::Loc;
use super::record::{
    Kind, REC_HDR_LEN, REC_OVERHEAD, SEG_HDR_LEN, crc_seed, record_header, segment_header,
};
use super::{Envelope, MsgId, RcptStatus};

/// Flush the batch buffer to the file once it holds this much (large bodies
/// streamed from scratch files are written in pieces of about this size).
const FLUSH_AT: usize = 4 << 20;
/// The committer keeps its batch buffer up to this size between batches.
const KEEP_BATCH_BUF: usize = 1 << 20;

/// Test and fault-drill hook: make the next N segment writes, syncs or
/// seals fail. Failed writes first write half of their bytes, like a disk
/// that fills up mid-write; they report `ENOSPC`. Failed syncs report `EIO`
/// without syncing, like a device that lost the pages. Failed seals report
/// `EIO` before cutting anything, so the failed batch's bytes stay in the
/// file until a seal succeeds.
#[derive(Debug, Default)]
pub struct Faults {
    writes: AtomicU32,
    syncs: AtomicU32,
    seals: AtomicU32,
}

impl Faults {
    pub const fn none() -> Faults {
        Faults {
            writes: AtomicU32::new(0),
            syncs: AtomicU32::new(0),
            seals: AtomicU32::new(0),
        }
    }

    pub fn fail_seals(&self, n: u32) {
        self.seals.store(n, Ordering::SeqCst);
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

pub(crate) use crate::fsutil::sync_dir;

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
    /// A poisoned segment's cut back to `end` is durable (see `seal`).
    pub sealed: bool,
    /// The file already has its full size (zero-filled), so appends below
    /// that size change no file metadata and `fdatasync` flushes data only.
    pub prealloc: bool,
}

impl SegmentWriter {
    /// Create segment `no` with its header synced, then sync the directory
    /// so the new name survives a crash. The fallback when no prepared
    /// segment is ready (`spare.rs`): this file grows with every batch.
    ///
    /// A failed attempt (a full disk, say) removes its file, so the next
    /// batch can try the same number again. If even that removal failed,
    /// the next attempt finds a file too short to hold any record (at most
    /// a header, never a commit) and replaces it: without that, every later
    /// batch would fail with "file exists" until a restart.
    pub fn create(dir: &Path, no: u32, syncs: &AtomicU64) -> io::Result<SegmentWriter> {
        let nonce: u64 = rand::random();
        let path = segment_path(dir, no);
        if std::fs::metadata(&path).is_ok_and(|m| m.is_file() && m.len() <= SEG_HDR_LEN) {
            std::fs::remove_file(&path)?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        let hdr = segment_header(nonce);
        let prepared = (|| {
            file.write_all_at(&hdr, 0)?;
            syncs.fetch_add(1, Ordering::Relaxed);
            file.sync_data()?;
            sync_dir(dir)
        })();
        if let Err(e) = prepared {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        Ok(SegmentWriter {
            no,
            nonce,
            file,
            end: hdr.len() as u64,
            poisoned: false,
            sealed: false,
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
            sealed: false,
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

    /// Cut a poisoned segment back to its logical end and make the cut
    /// durable, so recovery never finds a record of the batch that failed.
    /// After a failed `fdatasync` the kernel may have dropped the pages it
    /// could not write and a later sync of the same file can succeed without
    /// them (the "fsyncgate" lesson), so that batch's records are never
    /// trusted: they were answered with an error and are cut here. This
    /// `fsync` vouches only for the cut (the file's size and the zeroed
    /// tail of its last page), never for the failed records; the records
    /// before `end` were durable since their own sync.
    pub fn seal(&mut self, faults: &Faults, syncs: &AtomicU64) -> io::Result<()> {
        if Faults::take(&faults.seals) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.file.set_len(self.end)?;
        syncs.fetch_add(1, Ordering::Relaxed);
        // `sync_all`: the size changed.
        self.file.sync_all()?;
        self.sealed = true;
        Ok(())
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
    /// Set by `append_batch` when this record alone could not be written
    /// (its scratch file could not be read, or its payload does not fit the
    /// 32-bit length): it is not in the log, and only its own waiter fails.
    pub failed: Option<io::Error>,
}

impl OutRec {
    fn new(id: MsgId, kind: Kind, head: Vec<u8>, body: Option<Body>, apply: Apply) -> OutRec {
        OutRec {
            id,
            kind,
            head,
            body,
            apply,
            loc: Loc::default(),
            failed: None,
        }
    }

    /// A MSG record; `head` is `record::msg_head(id, &env)`.
    pub fn msg(id: MsgId, head: Vec<u8>, body: Body, env: Envelope) -> OutRec {
        OutRec::new(id, Kind::Msg, head, Some(body), Apply::Msg(env))
    }

    /// A STATE record; `head` is `record::state_payload(id, &changes)`.
    pub fn state(id: MsgId, head: Vec<u8>, changes: Vec<(usize, RcptStatus)>) -> OutRec {
        OutRec::new(id, Kind::State, head, None, Apply::State(changes))
    }

    /// A DONE record (payload: the id).
    pub fn done(id: MsgId) -> OutRec {
        OutRec::new(
            id,
            Kind::Done,
            id.0.to_le_bytes().to_vec(),
            None,
            Apply::Done,
        )
    }

    /// Payload length (what the record header's `len` must hold).
    pub fn payload_len(&self) -> u64 {
        self.head.len() as u64 + self.body.as_ref().map_or(0, Body::len)
    }

    pub fn total(&self) -> u64 {
        REC_OVERHEAD as u64 + self.payload_len()
    }
}

/// Whether a payload of `len` bytes fits a record (the header's `len` is a
/// `u32`). `Spool::commit` checks this before a message joins a batch.
pub(crate) fn check_payload_len(len: u64) -> io::Result<u32> {
    u32::try_from(len).map_err(|_| {
        io::Error::new(
            io::ErrorKind::FileTooLarge,
            format!("payload of {len} bytes does not fit a spool record (4 GiB - 1 at most)"),
        )
    })
}

/// The process's file-size limit (`RLIMIT_FSIZE`: `ulimit -f`, `prlimit
/// --fsize`), if it has one: no file can grow past it (`EFBIG`).
pub(crate) fn file_size_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit struct for the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_FSIZE, &mut lim) } != 0 {
        return None;
    }
    #[allow(clippy::unnecessary_cast)] // rlim_t differs between targets
    (lim.rlim_cur != libc::RLIM_INFINITY).then_some(lim.rlim_cur as u64)
}

/// Whether a MSG record with a payload of `len` bytes fits a segment under
/// the file-size limit `limit` (`u64::MAX`: none). One that cannot is
/// refused before it joins a batch, so it fails alone with `EFBIG`'s kind.
pub(crate) fn check_file_limit(len: u64, limit: u64) -> io::Result<()> {
    let total = SEG_HDR_LEN
        .saturating_add(REC_OVERHEAD as u64)
        .saturating_add(len);
    if total > limit {
        return Err(io::Error::new(
            io::ErrorKind::FileTooLarge,
            format!(
                "a spool record of {len} bytes does not fit the file-size limit of {limit} bytes"
            ),
        ));
    }
    Ok(())
}

/// Append `recs` at the writer's end and `fdatasync` once. On any error of
/// the segment itself the file is cut back to where the batch started and
/// nothing of it counts. A record that fails on its own (see
/// `OutRec::failed`) is left out and the others are written as usual.
pub(crate) fn append_batch(
    w: &mut SegmentWriter,
    recs: &mut [OutRec],
    faults: &Faults,
    syncs: &AtomicU64,
    buf: &mut Vec<u8>,
) -> io::Result<()> {
    let start = w.end;
    let res = write_records(w, recs, faults, buf).and_then(|(end, written)| {
        // Nothing reached the file (every record failed on its own before
        // any flush): there is nothing to make durable.
        if written > start {
            w.sync(faults, syncs)?;
        }
        Ok(end)
    });
    match res {
        Ok(end) => {
            w.end = end;
            Ok(())
        }
        Err(e) => {
            // Never append to this file again: after a failed fdatasync the
            // kernel may have dropped the dirty pages it could not write, so
            // later syncs of the same file prove nothing (the "fsyncgate"
            // lesson). Rolling also lets a full disk recover: the old
            // segment, once all its messages are done, is deleted, which
            // it never would be while it stayed the active one.
            w.poisoned = true;
            // Cutting back also drops a preallocated segment's zero tail:
            // nothing is lost, and a short file has an unambiguous end.
            // When the storage is still failing, the committer retries the
            // seal before the next batch (`Log::roll_if_needed`).
            debug_assert_eq!(w.end, start);
            if let Err(t) = w.seal(faults, syncs) {
                tracing::error!(segment = w.no, error = %t, "spool.seal_failed");
            }
            Err(e)
        }
    }
}

/// Why one record could not be written.
enum RecErr {
    /// The record itself (scratch read, size): skip it, keep the batch.
    Own(io::Error),
    /// The segment write failed: the whole batch fails.
    Segment(io::Error),
}

/// The batch being written: bytes in `buf` go to `off` onwards.
struct Cursor<'a> {
    w: &'a SegmentWriter,
    faults: &'a Faults,
    buf: Vec<u8>,
    off: u64,
    /// The highest offset any write of this batch reached.
    high: u64,
}

impl Cursor<'_> {
    /// Offset of the next byte appended to `buf`.
    fn pos(&self) -> u64 {
        self.off + self.buf.len() as u64
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.w.write_at(&self.buf, self.off, self.faults)?;
            self.off += self.buf.len() as u64;
            self.high = self.high.max(self.off);
            self.buf.clear();
        }
        Ok(())
    }

    fn flush_if_full(&mut self) -> io::Result<()> {
        if self.buf.len() >= FLUSH_AT {
            self.flush()?;
        }
        Ok(())
    }

    /// Drop everything from `to` on (a record that could not be finished):
    /// the next record starts there and overwrites what was flushed of it.
    fn rewind(&mut self, to: u64) {
        if to >= self.off {
            self.buf
                .truncate(usize::try_from(to - self.off).unwrap_or(0));
        } else {
            self.buf.clear();
            self.off = to;
        }
    }
}

/// Encode and write every record; returns the new logical end and the
/// highest offset written. Bytes of a skipped record that were flushed and
/// not overwritten by a later one are cleared before returning, so "only
/// zeros after the logical end" still holds for the sync that follows.
fn write_records(
    w: &SegmentWriter,
    recs: &mut [OutRec],
    faults: &Faults,
    buf: &mut Vec<u8>,
) -> io::Result<(u64, u64)> {
    let cap = recs
        .iter()
        .map(|r| r.total())
        .sum::<u64>()
        .min(FLUSH_AT as u64 * 2);
    let mut c = Cursor {
        w,
        faults,
        buf: std::mem::take(buf),
        off: w.end,
        high: w.end,
    };
    c.buf.clear();
    c.buf.reserve(usize::try_from(cap).unwrap_or(FLUSH_AT));
    let res = write_all_records(&mut c, recs);
    // Kept for the next batch, but not the few MiB one huge batch needed.
    c.buf.clear();
    c.buf.shrink_to(KEEP_BATCH_BUF);
    *buf = c.buf;
    res
}

fn write_all_records(c: &mut Cursor<'_>, recs: &mut [OutRec]) -> io::Result<(u64, u64)> {
    let w = c.w;
    let seed = crc_seed(w.nonce);
    for r in recs.iter_mut() {
        let rec_off = c.pos();
        match put_record(c, r, seed) {
            Ok(()) => {
                r.loc = Loc {
                    seg: w.no,
                    off: rec_off,
                    len: r.total(),
                    body_off: (REC_HDR_LEN + r.head.len()) as u64,
                    body_len: r.body.as_ref().map_or(0, Body::len),
                };
            }
            Err(RecErr::Own(e)) => {
                tracing::warn!(queue_id = %r.id, error = %e, "spool.record_skipped");
                c.rewind(rec_off);
                r.failed = Some(e);
            }
            Err(RecErr::Segment(e)) => return Err(e),
        }
        c.flush_if_full()?;
    }
    c.flush()?;
    let (end, high) = (c.off, c.high);
    if high > end {
        clear_stale(w, end, high, c.faults)?;
    }
    Ok((end, high))
}

/// Remove the leftovers of a skipped record in `[end, high)`: zeros in a
/// preallocated segment (it keeps its size), a truncation otherwise.
fn clear_stale(w: &SegmentWriter, end: u64, high: u64, faults: &Faults) -> io::Result<()> {
    if !w.prealloc {
        return w.file.set_len(end);
    }
    let zeros = vec![0u8; usize::try_from(high - end).map_or(FLUSH_AT, |n| n.min(FLUSH_AT))];
    let mut off = end;
    while off < high {
        let n = zeros
            .len()
            .min(usize::try_from(high - off).unwrap_or(usize::MAX));
        w.write_at(&zeros[..n], off, faults)?;
        off += n as u64;
    }
    Ok(())
}

/// Append one record (header, payload, CRC) to the cursor.
fn put_record(c: &mut Cursor<'_>, r: &OutRec, seed: u32) -> Result<(), RecErr> {
    let plen = check_payload_len(r.payload_len()).map_err(RecErr::Own)?;
    let hdr = record_header(r.kind, plen);
    let mut crc = crc32c::crc32c_append(seed, &hdr);
    crc = crc32c::crc32c_append(crc, &r.head);
    c.buf.extend_from_slice(&hdr);
    c.buf.extend_from_slice(&r.head);
    if let Some(body) = &r.body {
        crc = put_body(c, body, crc)?;
    }
    c.buf.extend_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// Appends a body's octets to the cursor; returns the running CRC.
fn put_body(c: &mut Cursor<'_>, body: &Body, mut crc: u32) -> Result<u32, RecErr> {
    match body {
        Body::Mem(v) => {
            crc = crc32c::crc32c_append(crc, v);
            c.buf.extend_from_slice(v);
        }
        Body::Prefixed(prefix, rest) => {
            crc = crc32c::crc32c_append(crc, prefix);
            c.buf.extend_from_slice(prefix);
            crc = put_body(c, rest, crc)?;
        }
        Body::File(s) => {
            let mut pos = 0u64;
            let mut chunk = vec![0u8; FLUSH_AT.min(s.len as usize).max(1)];
            while pos < s.len {
                let n = chunk.len().min((s.len - pos) as usize);
                s.file
                    .read_exact_at(&mut chunk[..n], pos)
                    .map_err(RecErr::Own)?;
                crc = crc32c::crc32c_append(crc, &chunk[..n]);
                c.buf.extend_from_slice(&chunk[..n]);
                pos += n as u64;
                c.flush_if_full().map_err(RecErr::Segment)?;
            }
        }
    }
    Ok(crc)
}
