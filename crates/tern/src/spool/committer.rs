//! The committer: the one thread that owns the active segment.
//!
//! It blocks for the first request, then takes every other request already
//! waiting, validates them against the index, appends them as one batch with
//! one `fdatasync`, applies them to the index and only then completes every
//! waiter. No timer: while a sync runs, the next batch gathers in the channel.
//! When the channel is empty after a batch it reclaims space (`compact.rs`).
//!
//! Invariants: only this thread (and recovery, before it starts) writes
//! segments or mutates the index; a waiter gets `Ok` only after the sync that
//! covered its record returned `Ok`.
//! It runs on a plain OS thread, not a tokio worker, because every step is a
//! blocking file-system call; async callers wait on oneshot channels.
//! Errors: a failed batch answers `SpoolError::Io` to every waiter of that
//! batch; validation failures (`NotFound`, bad recipient index) answer only
//! the request concerned and are never written.

use std::collections::{BTreeSet, HashSet};
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{mpsc, oneshot};

use super::draft::Body;
use super::index::{Index, Loc, SegInfo};
use super::record::{Kind, SEG_HDR_LEN, msg_head, state_payload};
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
}

impl Shared {
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
        body: Body,
    },
    State {
        id: MsgId,
        changes: Vec<(usize, RcptStatus)>,
    },
    Done {
        id: MsgId,
    },
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
}

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
    fn roll_if_needed(&mut self, need: u64) -> io::Result<()> {
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
        self.active = w;
        Ok(())
    }

    /// Write `recs` durably (one sync), then apply them to the index.
    pub fn commit_records(&mut self, recs: &mut Vec<OutRec>) -> io::Result<()> {
        self.commit_records_with(recs, Injection::Armed)
    }

    /// As `commit_records`, for housekeeping (compaction, recovery rewrites):
    /// injected test faults are meant for callers' requests, and a background
    /// compaction must not consume them at a random moment.
    pub fn commit_housekeeping(&mut self, recs: &mut Vec<OutRec>) -> io::Result<()> {
        self.commit_records_with(recs, Injection::Off)
    }

    fn commit_records_with(
        &mut self,
        recs: &mut Vec<OutRec>,
        injection: Injection,
    ) -> io::Result<()> {
        static NO_FAULTS: Faults = Faults::none();
        let need = recs.iter().map(OutRec::total).sum();
        self.roll_if_needed(need)?;
        let faults = match injection {
            Injection::Armed => &self.shared.faults,
            Injection::Off => &NO_FAULTS,
        };
        append_batch(&mut self.active, recs, faults, &self.shared.syncs)?;
        let mut idx = self.shared.index();
        for r in recs.drain(..) {
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
        Ok(())
    }

    /// Turn one request into a record, or reject it. `Ok(None)` is `Close`.
    fn prepare(
        idx: &Index,
        finished: &mut HashSet<MsgId>,
        op: Op,
    ) -> Result<Option<OutRec>, SpoolError> {
        let live = |id: MsgId| idx.msgs.get(&id).filter(|_| !finished.contains(&id));
        let rec = match op {
            Op::Close => return Ok(None),
            Op::Msg { id, env, body } => OutRec {
                id,
                kind: Kind::Msg,
                head: msg_head(id, &env).map_err(SpoolError::Corrupt)?,
                body: Some(body),
                apply: Apply::Msg(*env),
                loc: Loc::default(),
            },
            Op::State { id, changes } => {
                let e = live(id).ok_or(SpoolError::NotFound(id))?;
                let n = e.env.recipients.len();
                if let Some((i, _)) = changes.iter().find(|(i, _)| *i >= n) {
                    return Err(SpoolError::Io(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("recipient index {i} out of range for {id} ({n} recipients)"),
                    )));
                }
                OutRec {
                    id,
                    kind: Kind::State,
                    head: state_payload(id, &changes).map_err(SpoolError::Corrupt)?,
                    body: None,
                    apply: Apply::State(changes),
                    loc: Loc::default(),
                }
            }
            Op::Done { id } => {
                live(id).ok_or(SpoolError::NotFound(id))?;
                finished.insert(id);
                OutRec {
                    id,
                    kind: Kind::Done,
                    head: id.0.to_le_bytes().to_vec(),
                    body: None,
                    apply: Apply::Done,
                    loc: Loc::default(),
                }
            }
        };
        Ok(Some(rec))
    }

    /// One batch. Returns true if a `Close` was in it.
    fn process(&mut self, reqs: Vec<Req>) -> bool {
        let mut recs = Vec::with_capacity(reqs.len());
        let mut waiters = Vec::with_capacity(reqs.len());
        let mut closers = Vec::new();
        {
            let idx = self.shared.index();
            let mut finished = HashSet::new();
            for req in reqs {
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
            match self.commit_records(&mut recs) {
                Ok(()) => {
                    tracing::debug!(records = n, "queue.commit");
                    for w in waiters {
                        let _ = w.send(Ok(()));
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
        // Dropping the records removes the scratch files of spilled bodies.
        drop(recs);
        let closing = !closers.is_empty();
        for c in closers {
            let _ = c.send(Ok(()));
        }
        closing
    }
}

/// The committer thread's body.
pub(crate) fn run(mut log: Log, mut rx: mpsc::UnboundedReceiver<Req>) {
    while let Some(first) = rx.blocking_recv() {
        let mut reqs = vec![first];
        while let Ok(r) = rx.try_recv() {
            reqs.push(r);
        }
        if log.process(reqs) {
            break;
        }
        if rx.is_empty() {
            log.reclaim();
        }
    }
    tracing::debug!("spool.committer_stopped");
}
