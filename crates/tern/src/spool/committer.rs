//! The committer: the one thread that owns the active segment.
//!
//! It blocks for the first request, then takes every other request already
//! waiting, validates them against the index, appends them as one batch with
//! one `fdatasync`, applies them to the index and only then completes every
//! waiter. While a sync runs, the next batch gathers in the channel; a batch
//! holding a new message also waits up to `commit_wait` for the bodies other
//! sessions are still receiving (`Log::gather`), never for outcome records.
//! When the channel is empty after a batch it reclaims space (`compact.rs`).
//!
//! Invariants: only this thread (and recovery, before it starts) writes
//! segments or mutates the index; a waiter gets `Ok` only after the sync that
//! covered its record returned `Ok`.
//! It runs on a plain OS thread, not a tokio worker, because every step is a
//! blocking file-system call; async callers wait on oneshot channels.
//! Errors: a failed batch (segment write or sync) answers `SpoolError::Io` to
//! every waiter of that batch; validation failures (`NotFound`, bad recipient
//! index) and failures of one record alone (its scratch file cannot be read,
//! see `writer.rs`) answer only the request concerned and are never written.
//! Payloads are encoded by the callers (`Spool::commit`, `Spool::update`), so
//! the index lock is held here only for lookups.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::draft::Body;
use super::index::{Index, SegInfo};
use super::record::SEG_HDR_LEN;
use super::spare::{self, Spares};
use super::writer::{Apply, Faults, OutRec, SegmentWriter, append_batch};
use super::{Envelope, IdGen, MsgId, RcptStatus, SpoolError};

/// State shared between the async API and the committer thread.
pub(crate) struct Shared {
    pub dir: PathBuf,
    pub index: Mutex<Index>,
    /// Every fdatasync/fsync issued on segments (metrics and tests).
    pub syncs: AtomicU64,
    pub faults: Faults,
    pub ids: IdGen,
    pub closed: AtomicBool,
    /// Bodies being received right now (live `Draft`s): commits that will
    /// arrive soon, which a batch may wait for (`run`).
    pub open_drafts: Arc<AtomicUsize>,
    /// The process's file-size limit at open (`u64::MAX`: none). Segments
    /// are no larger (`open_log`), a message whose record cannot fit is
    /// refused before its batch, and a batch larger than it is written in
    /// parts.
    pub file_limit: AtomicU64,
}

impl Shared {
    pub fn file_limit(&self) -> u64 {
        self.file_limit.load(Ordering::Relaxed)
    }

    /// The index lock. A panic while holding it cannot leave it half-updated
    /// in a way later readers could not cope with, so poisoning is ignored.
    pub fn index(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub(crate) enum Op {
    Msg {
        id: MsgId,
        env: Box<Envelope>,
        /// `record::msg_head(id, &env)`, encoded by the caller.
        head: Vec<u8>,
        body: Body,
    },
    State {
        id: MsgId,
        changes: Vec<(usize, RcptStatus)>,
        /// `record::state_payload(id, &changes)`, encoded by the caller.
        head: Vec<u8>,
    },
    Done {
        id: MsgId,
    },
    /// Nothing to write: a wake-up so that space is reclaimed on an idle
    /// spool too (compaction waits for segments to settle).
    Reclaim,
    Close,
}

pub(crate) struct Req {
    pub op: Op,
    pub reply: oneshot::Sender<Result<(), SpoolError>>,
}

/// The committer's state: the active segment and reclaim bookkeeping.
pub(crate) struct Log {
    pub shared: Arc<Shared>,
    pub active: SegmentWriter,
    pub segment_size: u64,
    /// Segments whose compaction failed once (unreadable record): not retried.
    pub skip_compact: BTreeSet<u32>,
    /// The next, preallocated segment being prepared in the background.
    pub spares: Spares,
    /// Damaged segments still in place because their move to `corrupt/`
    /// failed at recovery: reclaiming moves them there instead of deleting
    /// them (damage is kept, never thrown away).
    pub unmoved: BTreeSet<u32>,
    /// When each segment stopped being the active one; segments from
    /// before the start count from `started`.
    pub closed_at: HashMap<u32, Instant>,
    pub started: Instant,
    pub compact_after: Duration,
    /// `SpoolConfig::commit_wait`.
    pub commit_wait: Duration,
    /// The buffer a batch is encoded into, kept from batch to batch: a
    /// fresh one per batch cost a page fault per touched page (and, where
    /// the allocator asks for huge pages, zeroing 2 MiB: measured 1% of all
    /// CPU at 4 KiB messages).
    pub batch_buf: Vec<u8>,
}

/// Per-record results of a committed batch, in record order.
pub(crate) type Outcomes = Vec<io::Result<()>>;

/// Whether injected test faults apply to a write.
#[derive(Clone, Copy)]
enum Injection {
    Armed,
    Off,
}

impl Log {
    /// Start a new segment when the batch would overflow the active one, or
    /// when the active one could not be cut back after a failure. Also roll
    /// early out of a growing segment as soon as a preallocated one is
    /// ready, so the hot-path `fdatasync` stops writing file metadata.
    ///
    /// A poisoned segment whose seal failed (the storage was failing) is
    /// sealed first, and until that succeeds no batch commits anywhere: a
    /// record of the failed batch must never outlive its error reply in a
    /// segment that recovery would read after later, acknowledged ones.
    fn roll_if_needed(&mut self, need: u64) -> io::Result<()> {
        if self.active.poisoned && !self.active.sealed {
            self.active.seal(&self.shared.faults, &self.shared.syncs)?;
            tracing::info!(segment = self.active.no, "spool.segment_sealed");
        }
        let full = self.active.end > SEG_HDR_LEN && self.active.end + need > self.segment_size;
        let needed = self.active.poisoned || full;
        let early = !self.active.prealloc && self.spares.ready();
        if !needed && !early {
            return Ok(());
        }
        let no = self.active.no + 1;
        let dir = &self.shared.dir;
        let w = match self.spares.take().map(|p| spare::activate(p, dir, no)) {
            Some(Ok(w)) => w,
            Some(Err(e)) if !needed => {
                tracing::warn!(segment = no, error = %e, "spool.spare_activate_failed");
                return Ok(());
            }
            other => {
                if let Some(Err(e)) = other {
                    tracing::warn!(segment = no, error = %e, "spool.spare_activate_failed");
                }
                // Nothing prepared (yet): the old way, a growing file.
                SegmentWriter::create(dir, no, &self.shared.syncs)?
            }
        };
        let info = SegInfo {
            nonce: w.nonce,
            size: w.end,
            ..SegInfo::default()
        };
        self.shared.index().segs.insert(no, info);
        tracing::info!(
            segment = no,
            preallocated = w.prealloc,
            "spool.segment_roll"
        );
        self.closed_at.insert(self.active.no, Instant::now());
        self.active = w;
        Ok(())
    }

    /// Write `recs` durably (one sync), then apply them to the index. `Err`
    /// means none of them was written; otherwise one outcome per record
    /// (a record that failed on its own is neither written nor applied).
    pub fn commit_records(&mut self, recs: &mut Vec<OutRec>) -> io::Result<Outcomes> {
        self.commit_records_with(recs, Injection::Armed)
    }

    /// As `commit_records`, for housekeeping (compaction, recovery rewrites):
    /// injected test faults are meant for callers' requests, and a background
    /// compaction must not consume them at a random moment. Copies have
    /// in-memory bodies that were written once already, so a record failing
    /// on its own is unexpected: it is reported as an error of the whole
    /// call (the records that were written are applied, which is harmless:
    /// the newest copy wins).
    pub fn commit_housekeeping(&mut self, recs: &mut Vec<OutRec>) -> io::Result<()> {
        let outcomes = self.commit_records_with(recs, Injection::Off)?;
        outcomes.into_iter().collect()
    }

    fn commit_records_with(
        &mut self,
        recs: &mut Vec<OutRec>,
        injection: Injection,
    ) -> io::Result<Outcomes> {
        static NO_FAULTS: Faults = Faults::none();
        let need: u64 = recs.iter().map(OutRec::total).sum();
        let limit = self.shared.file_limit();
        if recs.len() > 1 && SEG_HDR_LEN.saturating_add(need) > limit {
            return Ok(self.commit_in_parts(recs, injection, limit));
        }
        self.roll_if_needed(need)?;
        let faults = match injection {
            Injection::Armed => &self.shared.faults,
            Injection::Off => &NO_FAULTS,
        };
        append_batch(
            &mut self.active,
            recs,
            faults,
            &self.shared.syncs,
            &mut self.batch_buf,
        )?;
        let mut idx = self.shared.index();
        let mut outcomes = Vec::with_capacity(recs.len());
        for r in recs.drain(..) {
            if let Some(e) = r.failed {
                outcomes.push(Err(e));
                continue;
            }
            outcomes.push(Ok(()));
            match r.apply {
                Apply::Msg(env) => idx.apply_msg(r.id, env, r.loc),
                Apply::State(ch) => {
                    idx.apply_state(r.id, ch, r.loc.seg);
                }
                Apply::Done => {
                    idx.apply_done(r.id, r.loc.seg);
                }
            }
        }
        let (no, end) = (self.active.no, self.active.end);
        idx.segs.entry(no).or_default().size = end;
        drop(idx);
        self.spares.maybe_start(&self.active, &self.shared);
        Ok(outcomes)
    }

    /// A batch that no segment can hold under the file-size limit, written
    /// as parts that each fit one (every record fits alone: `Spool::commit`
    /// checks). One sync per part, on a path that only a low `ulimit -f`
    /// and many large messages at once ever take; a part that fails
    /// answers its own records, never those of parts already durable.
    fn commit_in_parts(
        &mut self,
        recs: &mut Vec<OutRec>,
        injection: Injection,
        limit: u64,
    ) -> Outcomes {
        let mut outcomes = Vec::with_capacity(recs.len());
        let mut rest = std::mem::take(recs).into_iter().peekable();
        while rest.peek().is_some() {
            let mut part = Vec::new();
            let mut size = SEG_HDR_LEN;
            while let Some(r) =
                rest.next_if(|r| part.is_empty() || size.saturating_add(r.total()) <= limit)
            {
                size = size.saturating_add(r.total());
                part.push(r);
            }
            let n = part.len();
            match self.commit_records_with(&mut part, injection) {
                Ok(done) => outcomes.extend(done),
                Err(e) => outcomes.extend((0..n).map(|_| Err(copy_io_error(&e)))),
            }
        }
        outcomes
    }

    /// Turn one request into a record, or reject it. `Ok(None)` is `Close`.
    /// Only lookups happen here (under the index lock): payloads arrive
    /// encoded.
    fn prepare(
        idx: &Index,
        finished: &mut HashSet<MsgId>,
        op: Op,
    ) -> Result<Option<OutRec>, SpoolError> {
        let live = |id: MsgId| idx.msgs.get(&id).filter(|_| !finished.contains(&id));
        let rec = match op {
            Op::Close | Op::Reclaim => return Ok(None),
            Op::Msg {
                id,
                env,
                head,
                body,
            } => OutRec::msg(id, head, body, *env),
            Op::State { id, changes, head } => {
                let e = live(id).ok_or(SpoolError::NotFound(id))?;
                let n = e.env.recipients.len();
                if let Some((i, _)) = changes.iter().find(|(i, _)| *i >= n) {
                    return Err(SpoolError::Io(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("recipient index {i} out of range for {id} ({n} recipients)"),
                    )));
                }
                OutRec::state(id, head, changes)
            }
            Op::Done { id } => {
                live(id).ok_or(SpoolError::NotFound(id))?;
                finished.insert(id);
                OutRec::done(id)
            }
        };
        Ok(Some(rec))
    }

    /// One batch. Returns true if a `Close` was in it.
    pub(super) fn process(&mut self, reqs: Vec<Req>) -> bool {
        let mut recs = Vec::with_capacity(reqs.len());
        let mut waiters = Vec::with_capacity(reqs.len());
        let mut closers = Vec::new();
        {
            let idx = self.shared.index();
            let mut finished = HashSet::new();
            for req in reqs {
                if matches!(req.op, Op::Reclaim) {
                    let _ = req.reply.send(Ok(()));
                    continue;
                }
                match Self::prepare(&idx, &mut finished, req.op) {
                    Ok(Some(rec)) => {
                        recs.push(rec);
                        waiters.push(req.reply);
                    }
                    Ok(None) => closers.push(req.reply),
                    Err(e) => {
                        let _ = req.reply.send(Err(e));
                    }
                }
            }
        }
        if !recs.is_empty() {
            let n = recs.len();
            let started = Instant::now();
            let res = self.commit_records(&mut recs);
            crate::metrics::spool_commit(started.elapsed(), n);
            // Drop the records (a failed batch leaves them here) before
            // answering: that removes the scratch files of spilled bodies,
            // so a waiter never sees its scratch file after its answer.
            drop(recs);
            match res {
                Ok(outcomes) => {
                    tracing::debug!(records = n, "queue.commit");
                    for (w, res) in waiters.into_iter().zip(outcomes) {
                        let _ = w.send(res.map_err(SpoolError::Io));
                    }
                }
                Err(e) => {
                    tracing::error!(records = n, error = %e, "queue.commit_failed");
                    let e = SpoolError::Io(e);
                    for w in waiters {
                        let _ = w.send(Err(e.duplicate()));
                    }
                }
            }
        }
        let closing = !closers.is_empty();
        for c in closers {
            let _ = c.send(Ok(()));
        }
        closing
    }
}

/// A copy of `e` for another waiter (`io::Error` is not `Clone`).
pub(crate) fn copy_io_error(e: &io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(code) => io::Error::from_raw_os_error(code),
        None => io::Error::new(e.kind(), e.to_string()),
    }
}

/// How often a gathering batch looks for new requests.
const GATHER_POLL: Duration = Duration::from_micros(50);

impl Log {
    /// Let a batch that holds a new message wait up to `commit_wait` for the
    /// messages other sessions are still receiving, so that one `fdatasync`
    /// covers them all. Without the wait, a batch holds what arrived during
    /// the previous sync: at 20 sessions that was 2-3 messages, with it 7-15
    /// (fsyncs per relayed message 0.34 -> 0.07 at 4 KiB, 0.46 -> 0.15 at
    /// 100 KiB, and more messages per second, as the disk and the CPU spend
    /// less on syncs). Outcome records (STATE, DONE) never wait: nobody
    /// waits behind them but delivery, and they ride along with messages
    /// anyway. The wait ends early once no other body is being received,
    /// so a lone client never pays it.
    fn gather(&self, reqs: &mut Vec<Req>, rx: &mut mpsc::UnboundedReceiver<Req>) {
        let others_receiving = || self.shared.open_drafts.load(Ordering::Relaxed) > 0;
        if self.commit_wait.is_zero()
            || !others_receiving()
            || !reqs.iter().any(|r| matches!(r.op, Op::Msg { .. }))
        {
            return;
        }
        let deadline = Instant::now() + self.commit_wait;
        while others_receiving() && Instant::now() < deadline {
            std::thread::sleep(GATHER_POLL);
            while let Ok(r) = rx.try_recv() {
                reqs.push(r);
            }
        }
    }
}

/// The committer thread's body.
pub(crate) fn run(mut log: Log, mut rx: mpsc::UnboundedReceiver<Req>) {
    while let Some(first) = rx.blocking_recv() {
        let mut reqs = vec![first];
        while let Ok(r) = rx.try_recv() {
            reqs.push(r);
        }
        log.gather(&mut reqs, &mut rx);
        if log.process(reqs) {
            break;
        }
        if rx.is_empty() {
            log.reclaim();
        }
    }
    // A last try, so that a restart after the storage came back does not
    // find the failed batch's records.
    if log.active.poisoned && !log.active.sealed {
        let (faults, syncs) = (&log.shared.faults, &log.shared.syncs);
        if let Err(e) = log.active.seal(faults, syncs) {
            tracing::error!(segment = log.active.no, error = %e, "spool.seal_failed");
        }
    }
    tracing::debug!("spool.committer_stopped");
}
