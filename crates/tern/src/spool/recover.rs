//! Start-up scan: rebuild the index from the segments, cut a torn tail,
//! quarantine damaged segments.
//!
//! Classification, per segment, in number order:
//! - zeros from after the last valid record to the end of the file are the
//!   unused space of a preallocated segment: the clean end (the logical end
//!   is where they start; no record starts with a zero byte);
//! - a record that does not verify is followed by a search for the next
//!   record that does (resync on the magic; the CRC is seeded by the segment
//!   nonce, so quoted records inside bodies never match);
//! - damage with no valid record after it, in the **last** segment, is a torn
//!   tail: the write of a batch that never got its sync, so none of it was
//!   acknowledged. It is cut off: truncated (`set_len`), or in a
//!   preallocated segment overwritten with zeros so the file keeps its size;
//! - any other damage (in the middle, or at the end of an older segment) is
//!   corruption: the segment's live messages, the statuses and DONEs it holds
//!   are rewritten into the active segment (synced), then the segment is moved
//!   to `dir/corrupt/` (kept, logged, never deleted).
//!
//! Invariants: only records whose CRC verifies reach the index, so a partial
//! message is never delivered; a valid record after damage is never dropped.
//! The `scan` half never modifies anything (its `Scanner` also serves
//! `tern queue`, see `readonly.rs`).
//! A damaged segment leaves the index only once it is in `corrupt/`: while
//! it is still in place, the segments that must outlive it keep doing so
//! (if its move fails, reclaiming retries the move instead of deleting it).
//! Errors: `SpoolError::Io` when the directory or a segment cannot be read;
//! damage itself is never an error, only a report entry and a log line.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use super::committer::{Log, Shared};
use super::compact::{copy_forward, live_in};
use super::index::{Index, Loc, SegInfo};
use super::record::{
    Kind, Parsed, REC_HDR_LEN, SEG_HDR_LEN, data_end, decode_done, decode_msg, decode_state,
    parse_record, parse_segment_header, resync, state_payload,
};
use super::spare::Spares;
use super::writer::{OutRec, SegmentWriter, segment_path, sync_dir};
use super::{MsgId, RecoveryReport, SpoolConfig, SpoolError};

/// What the scan saw in one segment.
#[derive(Debug, Default)]
pub(crate) struct SegScan {
    pub no: u32,
    /// File size.
    pub len: u64,
    /// Logical end: just past the last valid record (the start of the torn
    /// tail, if any). Only zeros follow it in a clean segment.
    pub end: u64,
    /// Start of the trailing all-zero region (`len` if there is none): a
    /// preallocated segment's unused space.
    pub data_end: u64,
    /// `None`: the segment header is short or not ours.
    pub nonce: Option<u64>,
    /// Start of trailing damage with no valid record after it.
    pub torn_at: Option<u64>,
    /// Damaged regions followed by a valid record, `[start, end)`.
    pub bad: Vec<(u64, u64)>,
    pub state_ids: BTreeSet<MsgId>,
    pub done_ids: Vec<MsgId>,
}

pub(crate) struct ScanOutcome {
    pub index: Index,
    pub segs: Vec<SegScan>,
    pub max_id: u64,
}

/// Segment numbers in `dir`, ascending (names `NNNNNNNN.log`).
pub(crate) fn list_segments(dir: &Path) -> std::io::Result<Vec<u32>> {
    let mut out = Vec::new();
    for ent in std::fs::read_dir(dir)? {
        let name = ent?.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(stem) = name.strip_suffix(".log") else {
            continue;
        };
        if stem.len() == 8
            && stem.bytes().all(|b| b.is_ascii_digit())
            && let Ok(n) = stem.parse()
        {
            out.push(n);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Builds the index from segments fed in number order (used by `scan` and by
/// the read-only scan in `readonly.rs`).
#[derive(Default)]
pub(crate) struct Scanner {
    index: Index,
    done: HashSet<MsgId>,
    max_id: u64,
    segs: Vec<SegScan>,
}

impl Scanner {
    /// Scan the bytes of segment `no` (segments must come in number order).
    pub fn segment(&mut self, no: u32, buf: &[u8]) {
        let s = scan_segment(no, buf, &mut self.index, &mut self.done, &mut self.max_id);
        self.segs.push(s);
    }

    pub fn finish(self) -> ScanOutcome {
        ScanOutcome {
            index: self.index,
            segs: self.segs,
            max_id: self.max_id,
        }
    }
}

/// Scan every segment, for `Spool::open`. Never modifies anything. A
/// segment that vanishes between listing and reading is an error here: the
/// spool is not open, so nothing else should be removing segments.
pub(crate) fn scan(dir: &Path) -> Result<ScanOutcome, SpoolError> {
    let mut scanner = Scanner::default();
    for no in list_segments(dir)? {
        // Unreadable is not the same as damaged (a permission, a disk
        // error): refuse to start, naming the file, rather than set aside
        // a segment whose records may be intact.
        let path = segment_path(dir, no);
        let buf = std::fs::read(&path).map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot read {}: {e}", path.display()))
        })?;
        scanner.segment(no, &buf);
    }
    Ok(scanner.finish())
}

fn scan_segment(
    no: u32,
    buf: &[u8],
    index: &mut Index,
    done: &mut HashSet<MsgId>,
    max_id: &mut u64,
) -> SegScan {
    let data_end = data_end(buf);
    let header = parse_segment_header(buf);
    let mut s = SegScan {
        no,
        len: buf.len() as u64,
        data_end: data_end as u64,
        nonce: header.or_else(|| nonce_vouched_by_first_record(buf)),
        ..SegScan::default()
    };
    let Some(nonce) = s.nonce else { return s };
    if header.is_none() {
        // The records are intact but the header is not: damage, so the
        // segment is rewritten and set aside, its messages kept.
        s.bad.push((0, SEG_HDR_LEN));
    }
    let mut off = SEG_HDR_LEN as usize;
    // Past `data_end` there are only zeros: the normal end of a
    // preallocated segment (no record starts with a zero byte), so the
    // scan stops there without calling it damage. A record's own last
    // bytes may be zeros, hence `off` can end up beyond `data_end`.
    while off < data_end {
        match parse_record(&buf[off..], nonce) {
            Some(p) => {
                let total = p.total;
                if let Err(e) = apply_scanned(&p, no, off as u64, index, done, &mut s, max_id) {
                    // The CRC matched but the payload does not decode: a
                    // writer bug or a collision. Treat it as damage.
                    tracing::warn!(segment = no, offset = off, error = %e, "spool.record_undecodable");
                    s.bad.push((off as u64, (off + total) as u64));
                }
                off += total;
            }
            None => match resync(buf, off + 1, data_end, nonce) {
                Some(next) => {
                    s.bad.push((off as u64, next as u64));
                    off = next;
                }
                None => {
                    s.torn_at = Some(off as u64);
                    break;
                }
            },
        }
    }
    s.end = off as u64;
    let info = index.segs.entry(no).or_default();
    info.nonce = nonce;
    // Space accounting uses the logical end, never the preallocated size.
    info.size = s.end;
    s
}

/// The nonce of a segment whose header is damaged elsewhere (magic,
/// version or checksum), if its nonce bytes are intact: the first record's
/// checksum, which is seeded with the nonce, must verify with them. A wrong
/// guess passes a 32-bit checksum once in four billion.
fn nonce_vouched_by_first_record(buf: &[u8]) -> Option<u64> {
    let hdr = SEG_HDR_LEN as usize;
    let candidate = u64::from_le_bytes(buf.get(12..20)?.try_into().ok()?);
    parse_record(buf.get(hdr..)?, candidate).map(|_| candidate)
}

fn apply_scanned(
    p: &Parsed<'_>,
    no: u32,
    off: u64,
    index: &mut Index,
    done: &mut HashSet<MsgId>,
    s: &mut SegScan,
    max_id: &mut u64,
) -> Result<(), String> {
    match p.kind {
        Kind::Msg => {
            let (id, env, body_start) = decode_msg(p.payload)?;
            *max_id = (*max_id).max(id.0);
            // DONE anywhere wins, even over a later copy.
            if !done.contains(&id) {
                let loc = Loc {
                    seg: no,
                    off,
                    len: p.total as u64,
                    body_off: (REC_HDR_LEN + body_start) as u64,
                    body_len: (p.payload.len() - body_start) as u64,
                };
                index.apply_msg(id, env, loc);
            }
        }
        Kind::State => {
            let (id, changes) = decode_state(p.payload)?;
            *max_id = (*max_id).max(id.0);
            index.apply_state(id, changes, no);
            s.state_ids.insert(id);
        }
        Kind::Done => {
            let id = decode_done(p.payload)?;
            *max_id = (*max_id).max(id.0);
            done.insert(id);
            index.apply_done(id, no);
            s.done_ids.push(id);
        }
    }
    Ok(())
}

/// Repair what `scan` found and build the committer's `Log`.
pub(crate) fn repair(
    config: &SpoolConfig,
    shared: Arc<Shared>,
    segs: Vec<SegScan>,
    report: &mut RecoveryReport,
) -> Result<Log, SpoolError> {
    let dir = &config.dir;
    let last = segs.last().map(|s| s.no);
    let max_no = last.unwrap_or(0);
    let mut corrupt = Vec::new();
    let mut reuse = None;
    for s in segs {
        let is_last = Some(s.no) == last;
        match s.nonce {
            None if is_last && s.len < SEG_HDR_LEN => {
                // Crashed while creating it: it never held a record.
                std::fs::remove_file(segment_path(dir, s.no))?;
                sync_dir(dir)?;
                report.torn_tails_cut += 1;
                report.bytes_lost += s.len;
                tracing::warn!(segment = s.no, "spool.torn_segment_removed");
            }
            None => corrupt.push(s),
            Some(_) if !s.bad.is_empty() || (s.torn_at.is_some() && !is_last) => corrupt.push(s),
            Some(nonce) => {
                // A preallocated segment: full size, room left after the
                // logical end that appends can use without growing the file.
                let prealloc = s.len > s.end && s.len >= config.segment_size;
                if let Some(t) = s.torn_at {
                    cut_torn_tail(dir, &s, t, prealloc)?;
                    report.torn_tails_cut += 1;
                    report.bytes_lost += s.data_end - t;
                }
                if is_last {
                    reuse = Some((s.no, nonce, s.end, prealloc));
                }
            }
        }
    }
    let active = match reuse {
        Some((no, nonce, end, prealloc)) if end < config.segment_size => {
            SegmentWriter::open_existing(dir, no, nonce, end, prealloc)?
        }
        _ => {
            let w = SegmentWriter::create(dir, max_no + 1, &shared.syncs)?;
            let info = SegInfo {
                nonce: w.nonce,
                size: w.end,
                ..SegInfo::default()
            };
            shared.index().segs.insert(w.no, info);
            w
        }
    };
    let mut log = Log {
        shared,
        active,
        segment_size: config.segment_size,
        skip_compact: BTreeSet::new(),
        spares: Spares::new(dir, config.segment_size),
        unmoved: BTreeSet::new(),
        closed_at: HashMap::new(),
        started: Instant::now(),
        compact_after: config.compact_after,
        commit_wait: config.commit_wait,
        batch_buf: Vec::new(),
    };
    for s in corrupt {
        quarantine(&mut log, &s, report);
    }
    Ok(log)
}

/// Lost bytes in a damaged segment.
fn damaged_bytes(s: &SegScan) -> u64 {
    if s.nonce.is_none() {
        return s.data_end;
    }
    let mid: u64 = s.bad.iter().map(|(a, b)| b - a).sum();
    mid + s.torn_at.map_or(0, |t| s.data_end - t)
}

/// Rewrite what a damaged segment holds into the active one, then move it to
/// `corrupt/`. The segment leaves the index only once the move succeeded:
/// segments whose records refer to it must outlive it as long as its file is
/// in place (its MSG records would otherwise resurrect messages finished in
/// them at the next start). On failure (rewrite or move) it stays in place
/// and in the index (logged), is used as is, and reclaiming moves it to
/// `corrupt/` once nothing needs it (`Log::unmoved`).
fn quarantine(log: &mut Log, s: &SegScan, report: &mut RecoveryReport) {
    let dir = log.shared.dir.clone();
    let path = segment_path(&dir, s.no);
    tracing::error!(segment = s.no, bad_regions = s.bad.len(), torn = ?s.torn_at, "spool.segment_corrupt");
    log.unmoved.insert(s.no);
    let mut recs = rewrites(log, s, &path);
    if !recs.is_empty() {
        let res = log.commit_housekeeping(&mut recs);
        if let Err(e) = res {
            tracing::error!(segment = s.no, error = %e, "spool.quarantine_failed");
            return;
        }
    }
    {
        // Whatever this segment had to outlive, the rewritten records (in
        // the active segment) now must.
        let mut idx = log.shared.index();
        let refs = idx
            .segs
            .get(&s.no)
            .map(|i| i.refs.clone())
            .unwrap_or_default();
        let active = log.active.no;
        idx.segs.entry(active).or_default().refs.extend(refs);
    }
    match move_to_corrupt(&dir, &path, s.no) {
        Ok(dest) => {
            log.shared.index().segs.remove(&s.no);
            log.unmoved.remove(&s.no);
            report.bytes_lost += damaged_bytes(s);
            report.corrupt_segments.push(dest);
        }
        Err(e) => tracing::error!(segment = s.no, error = %e, "spool.quarantine_move_failed"),
    }
}

/// The records that carry a damaged segment's valid content forward: its live
/// messages (a message whose record cannot be read back is lost: logged and
/// dropped from the index), the current statuses of messages it holds STATE
/// records about, and its DONEs.
fn rewrites(log: &Log, s: &SegScan, path: &Path) -> Vec<OutRec> {
    let (moves, states) = {
        let idx = log.shared.index();
        let states: Vec<_> = s
            .state_ids
            .iter()
            .filter_map(|id| {
                idx.msgs
                    .get(id)
                    .filter(|e| e.loc.seg != s.no)
                    .map(|e| (*id, e.env.clone()))
            })
            .collect();
        (live_in(&idx, s.no), states)
    };
    let nonce = s.nonce.unwrap_or(0);
    let mut recs = Vec::new();
    for m in moves {
        let id = m.id;
        match copy_forward(path, nonce, m) {
            Ok(r) => recs.push(r),
            Err(e) => {
                tracing::error!(queue_id = %id, error = %e, "spool.message_lost");
                log.shared.index().apply_done(id, s.no);
            }
        }
    }
    for (id, env) in states {
        let changes: Vec<_> = env
            .recipients
            .into_iter()
            .map(|r| r.status)
            .enumerate()
            .collect();
        if let Ok(head) = state_payload(id, &changes) {
            recs.push(OutRec::state(id, head, changes));
        }
    }
    recs.extend(s.done_ids.iter().map(|id| OutRec::done(*id)));
    recs
}

/// Test hook: moves to `corrupt/` fail for spool directories listed here.
#[cfg(test)]
pub(crate) static FAIL_MOVES: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

/// Move a damaged segment into `dir/corrupt/` (never over an earlier one),
/// and make both directory entries durable.
pub(crate) fn move_to_corrupt(dir: &Path, path: &Path, no: u32) -> std::io::Result<PathBuf> {
    #[cfg(test)]
    if FAIL_MOVES
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .any(|d| d == dir)
    {
        return Err(std::io::Error::other("injected move failure"));
    }
    let cdir = dir.join("corrupt");
    std::fs::create_dir_all(&cdir)?;
    let mut dest = cdir.join(format!("{no:08}.log"));
    let mut n = 1;
    while dest.exists() {
        dest = cdir.join(format!("{no:08}.log.{n}"));
        n += 1;
    }
    std::fs::rename(path, &dest)?;
    sync_dir(dir)?;
    sync_dir(&cdir)?;
    Ok(dest)
}

/// Cut the torn tail that starts at `t` in the last segment. In a
/// preallocated segment the torn bytes are overwritten with zeros and the
/// file keeps its size, so the next append (at `t`) still goes into allocated
/// space and "only zeros after the logical end" holds again (leftover bytes
/// would otherwise make the segment look damaged once it is no longer the
/// last). A growing segment is truncated to `t`, as before.
fn cut_torn_tail(dir: &Path, s: &SegScan, t: u64, prealloc: bool) -> std::io::Result<()> {
    save_tail(dir, s.no, t, s.data_end);
    let f = OpenOptions::new()
        .write(true)
        .open(segment_path(dir, s.no))?;
    if prealloc {
        let zeros = vec![0u8; usize::try_from(s.data_end - t).unwrap_or(0).min(1 << 20)];
        let mut off = t;
        while off < s.data_end {
            let n = zeros
                .len()
                .min(usize::try_from(s.data_end - off).unwrap_or(usize::MAX));
            f.write_all_at(&zeros[..n], off)?;
            off += n as u64;
        }
    } else {
        f.set_len(t)?;
    }
    f.sync_data()?;
    tracing::warn!(
        segment = s.no,
        offset = t,
        bytes = s.data_end - t,
        kept_preallocation = prealloc,
        "spool.torn_tail_cut"
    );
    Ok(())
}

/// Keep a copy of a torn tail (`[from, to)`, the trailing zeros excluded) in
/// `corrupt/` before cutting it: normally it is an unacknowledged batch, but
/// if it was damage instead, the bytes are kept for forensics (nothing is
/// ever thrown away silently). Best effort.
fn save_tail(dir: &Path, no: u32, from: u64, to: u64) {
    let res = (|| -> std::io::Result<()> {
        let src = std::fs::File::open(segment_path(dir, no))?;
        let mut buf = vec![0u8; usize::try_from(to.saturating_sub(from)).unwrap_or(0)];
        src.read_exact_at(&mut buf, from)?;
        let cdir = dir.join("corrupt");
        std::fs::create_dir_all(&cdir)?;
        std::fs::write(cdir.join(format!("{no:08}.tail-{from}")), &buf)
    })();
    if let Err(e) = res {
        tracing::warn!(segment = no, error = %e, "spool.torn_tail_save_failed");
    }
}
