//! `Spool`: the public handle over the segment log (open, commit, update,
//! finish, queries, body reads). The read-only helpers for `tern queue` are
//! in `readonly.rs`.
//!
//! Invariants: every mutation goes through the committer channel, so callers
//! never touch segment files for writing; reads use `pread` on a fresh file
//! handle and verify the record CRC, retrying when compaction moved the
//! message meanwhile.
//! Does not schedule or deliver; does not hold bodies in memory.
//! Errors: see the `spool` module header.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot};

use super::committer::{self, Log, Op, Req, Shared};
use super::draft::{Draft, DraftCfg, clean_scratch};
use super::index::Loc;
use super::record::{Kind, REC_HDR_LEN, msg_head, parse_record, state_payload};
use super::recover;
use super::spare;
use super::writer::{Faults, check_file_limit, check_payload_len, file_size_limit, segment_path};
use super::{Envelope, IdGen, MsgId, RcptStatus, RecoveryReport, SpoolConfig, SpoolError};

/// What a delivery attempt leaves in the log for one message.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Every recipient is final: only the DONE record is needed (the
    /// per-recipient results are in the logs).
    Done(MsgId),
    /// New statuses for some recipients (by index).
    State(MsgId, Vec<(usize, RcptStatus)>),
}

/// Handle to the spool; cheap to clone (an `Arc` inside).
#[derive(Clone)]
pub struct Spool {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    /// `None` only while dropping, so the committer sees the channel close.
    tx: Option<mpsc::UnboundedSender<Req>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    draft_cfg: Arc<DraftCfg>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Close the channel, then wait for the committer to finish the batch
        // it may be writing, so a reopen never races with it.
        self.tx.take();
        let handle = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool")
            .field("dir", &self.inner.shared.dir)
            .finish()
    }
}

impl Spool {
    /// Scan `dir` (created if missing), rebuild the index, cut a torn tail,
    /// quarantine corrupt segments, remove stale scratch files, and start the
    /// committer thread.
    pub fn open(config: SpoolConfig) -> Result<(Spool, RecoveryReport), SpoolError> {
        let (log, report) = open_log(&config)?;
        let dir = config.dir.clone();
        let shared = log.shared.clone();
        let (tx, rx) = mpsc::unbounded_channel();
        let thread = std::thread::Builder::new()
            .name("tern-spool-committer".into())
            .spawn(move || committer::run(log, rx))?;
        spawn_reclaim_ticker(&tx, config.compact_after);
        tracing::info!(
            dir = %dir.display(),
            messages = report.messages,
            segments = report.segments,
            torn = report.torn_tails_cut,
            corrupt = report.corrupt_segments.len(),
            "spool.open"
        );
        let draft_cfg = Arc::new(draft_cfg(&config, &shared));
        let inner = Inner {
            shared,
            tx: Some(tx),
            thread: Mutex::new(Some(thread)),
            draft_cfg,
        };
        Ok((
            Spool {
                inner: Arc::new(inner),
            },
            report,
        ))
    }

    /// A new, empty body buffer.
    pub fn draft(&self) -> Draft {
        Draft::new(self.inner.draft_cfg.clone())
    }

    async fn request(&self, op: Op) -> Result<(), SpoolError> {
        self.send(op)?.await.map_err(|_| SpoolError::Closed)?
    }

    /// Hands one request to the committer without waiting for it.
    fn send(&self, op: Op) -> Result<oneshot::Receiver<Result<(), SpoolError>>, SpoolError> {
        if self.inner.shared.closed.load(Ordering::Acquire) {
            return Err(SpoolError::Closed);
        }
        let (reply, rx) = oneshot::channel();
        let tx = self.inner.tx.as_ref().ok_or(SpoolError::Closed)?;
        tx.send(Req { op, reply }).map_err(|_| SpoolError::Closed)?;
        Ok(rx)
    }

    /// Records many outcomes at once: every request reaches the committer
    /// before the first wait, so they share a group commit (two when the
    /// committer wakes on the first one), without a task per message. One
    /// result per outcome, in order.
    pub async fn record_many(&self, outcomes: Vec<Outcome>) -> Vec<Result<(), SpoolError>> {
        let sent: Vec<_> = outcomes
            .into_iter()
            .map(|o| {
                let op = match o {
                    Outcome::Done(id) => Op::Done { id },
                    Outcome::State(id, changes) => {
                        let head = state_payload(id, &changes).map_err(SpoolError::Corrupt)?;
                        check_payload_len(head.len() as u64)?;
                        Op::State { id, changes, head }
                    }
                };
                self.send(op)
            })
            .collect();
        let mut results = Vec::with_capacity(sent.len());
        for rx in sent {
            results.push(match rx {
                Ok(rx) => rx.await.unwrap_or(Err(SpoolError::Closed)),
                Err(e) => Err(e),
            });
        }
        results
    }

    /// Append the message and return once `fdatasync` covered it (group
    /// commit). Only then may the session send 250 (RFC 5321 §4.1.1.4: the
    /// receiver accepts responsibility for the message). On error nothing of
    /// the message is visible, now or after a restart.
    pub async fn commit(&self, envelope: Envelope, draft: Draft) -> Result<MsgId, SpoolError> {
        self.commit_as(self.reserve_id(), envelope, draft).await
    }

    /// A fresh queue ID, for a message whose ID must be known before its
    /// commit (the `id` clause of its `Received:` header). IDs are unique,
    /// also across restarts; one reserved but never committed is just unused.
    pub fn reserve_id(&self) -> MsgId {
        self.inner.shared.ids.next()
    }

    /// [`Spool::commit`] under an ID from [`Spool::reserve_id`] (each ID
    /// committed at most once).
    pub async fn commit_as(
        &self,
        id: MsgId,
        mut envelope: Envelope,
        mut draft: Draft,
    ) -> Result<MsgId, SpoolError> {
        if self.inner.shared.closed.load(Ordering::Acquire) {
            return Err(SpoolError::Closed);
        }
        envelope.size = draft.len();
        // Encoded here, in the caller's task, not by the committer under
        // the index lock. The size check is per message too: a record
        // that cannot be written must fail only its own commit, never the
        // batch it would have joined (the daemon's own limit is lower, but
        // the spool does not rely on it). Dropping the draft removes its
        // scratch file.
        let head = msg_head(id, &envelope).map_err(SpoolError::Corrupt)?;
        check_payload_len(head.len() as u64 + envelope.size)?;
        check_file_limit(
            head.len() as u64 + envelope.size,
            self.inner.shared.file_limit(),
        )?;
        let body = draft.take_body().await?;
        let sent = self.send(Op::Msg {
            id,
            env: Box::new(envelope),
            head,
            body,
        });
        // The committer's gather waits while bodies are still being
        // received: this one counts as such until its request is queued,
        // or a batch could leave without it for one sync of its own.
        drop(draft);
        sent?.await.map_err(|_| SpoolError::Closed)??;
        Ok(id)
    }

    /// Record new statuses for some recipients (by index), group-committed.
    pub async fn update(
        &self,
        id: MsgId,
        changes: Vec<(usize, RcptStatus)>,
    ) -> Result<(), SpoolError> {
        let head = state_payload(id, &changes).map_err(SpoolError::Corrupt)?;
        check_payload_len(head.len() as u64)?;
        self.request(Op::State { id, changes, head }).await
    }

    /// Mark the message finished; its space can be reclaimed.
    pub async fn finish(&self, id: MsgId) -> Result<(), SpoolError> {
        self.request(Op::Done { id }).await
    }

    /// The current envelope (statuses applied) of a live message.
    pub fn get(&self, id: MsgId) -> Option<Envelope> {
        self.inner
            .shared
            .index()
            .msgs
            .get(&id)
            .map(|e| e.env.clone())
    }

    /// All unfinished messages, oldest first.
    pub fn live(&self) -> Vec<(MsgId, Envelope)> {
        self.inner.shared.index().live()
    }

    /// How many messages the spool holds, not yet finished (local and
    /// outbound work alike).
    pub fn live_count(&self) -> usize {
        self.inner.shared.index().msgs.len()
    }

    /// Read a body back from the log (CRC checked).
    pub async fn read_body(&self, id: MsgId) -> Result<Vec<u8>, SpoolError> {
        let spool = self.clone();
        tokio::task::spawn_blocking(move || spool.read_body_blocking(id))
            .await
            .map_err(|e| SpoolError::Io(io::Error::other(e)))?
    }

    /// [`Spool::read_body`] for a caller already on a blocking thread.
    pub fn read_body_blocking(&self, id: MsgId) -> Result<Vec<u8>, SpoolError> {
        self.read_bodies_blocking(&[id])
            .pop()
            .unwrap_or(Err(SpoolError::NotFound(id)))
    }

    /// Reads many bodies in one blocking call (the delivery batch: a thread
    /// hand-off per message was most of delivery's time), opening each
    /// segment once for the whole call rather than once per message.
    pub fn read_bodies_blocking(&self, ids: &[MsgId]) -> Vec<Result<Vec<u8>, SpoolError>> {
        let mut open: HashMap<u32, std::fs::File> = HashMap::new();
        ids.iter().map(|&id| self.read_one(id, &mut open)).collect()
    }

    fn read_one(
        &self,
        id: MsgId,
        open: &mut HashMap<u32, std::fs::File>,
    ) -> Result<Vec<u8>, SpoolError> {
        // Compaction may move the message between the lookup and the read:
        // look it up again when the read fails and the location changed. A
        // handle kept open on a segment compaction has since deleted still
        // reads the old, verified bytes, so a cached handle is never stale
        // for the location it was looked up for (segment numbers are never
        // reused).
        for _ in 0..4 {
            let found = self.inner.shared.index().locate(id);
            let (loc, nonce) = found.ok_or(SpoolError::NotFound(id))?;
            let path = segment_path(&self.inner.shared.dir, loc.seg);
            let file = match open.entry(loc.seg) {
                Entry::Occupied(e) => Ok(e.into_mut()),
                Entry::Vacant(v) => std::fs::File::open(&path).map(|f| v.insert(f)),
            };
            let res = match file {
                Ok(file) => read_msg_body_from(file, &path, loc, nonce),
                Err(e) => Err(e.into()),
            };
            match res {
                Ok(body) => return Ok(body),
                Err(e) if self.inner.shared.index().locate(id) == Some((loc, nonce)) => {
                    return Err(e);
                }
                Err(_) => continue,
            }
        }
        Err(SpoolError::NotFound(id))
    }

    /// Bytes available to unprivileged users on the spool's file system
    /// (`statvfs`: `f_bavail * f_frsize`).
    pub fn free_space(&self) -> io::Result<u64> {
        free_space(&self.inner.shared.dir)
    }

    /// Finish the batch in flight and stop the committer. Later calls get
    /// `SpoolError::Closed`.
    pub async fn close(&self) {
        let _ = self.request(Op::Close).await;
        self.inner.shared.closed.store(true, Ordering::Release);
        let handle = self
            .inner
            .thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(h) = handle {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
    }

    /// fdatasync/fsync calls issued on segments since open (metrics, tests),
    /// including the one `fsync` per prepared spare segment (helper thread).
    pub fn sync_count(&self) -> u64 {
        self.inner.shared.syncs.load(Ordering::Relaxed)
    }

    /// Fault injection for tests and drills.
    #[doc(hidden)]
    pub fn faults(&self) -> &Faults {
        &self.inner.shared.faults
    }

    /// The spool directory.
    pub fn dir(&self) -> &Path {
        &self.inner.shared.dir
    }

    #[cfg(test)]
    pub(crate) fn inner_shared_for_tests(&self) -> &Shared {
        &self.inner.shared
    }

    #[cfg(test)]
    pub(crate) fn segment_numbers(&self) -> Vec<u32> {
        self.inner.shared.index().segs.keys().copied().collect()
    }

    /// Segments the next reclaim will delete. The active segment is always
    /// the newest: segments are numbered in the order they are opened.
    #[cfg(test)]
    pub(crate) fn dead_segments(&self) -> Vec<u32> {
        let idx = self.inner.shared.index();
        let active = idx.segs.keys().next_back().copied().unwrap_or(0);
        idx.dead_segments(active)
    }

    /// Dead closed segments kept only because they must outlive `seg`,
    /// directly or through another such segment.
    #[cfg(test)]
    pub(crate) fn segments_outliving(&self, seg: u32) -> Vec<u32> {
        let idx = self.inner.shared.index();
        let active = idx.segs.keys().next_back().copied().unwrap_or(0);
        let mut held = std::collections::BTreeSet::from([seg]);
        loop {
            let more: Vec<u32> = idx
                .segs
                .iter()
                .filter(|(no, s)| {
                    **no != active
                        && !held.contains(*no)
                        && s.live == 0
                        && s.refs.iter().any(|r| held.contains(r))
                })
                .map(|(no, _)| *no)
                .collect();
            if more.is_empty() {
                held.remove(&seg);
                return held.into_iter().collect();
            }
            held.extend(more);
        }
    }

    /// (segment, logical size) as the index sees them.
    #[cfg(test)]
    pub(crate) fn segment_sizes(&self) -> Vec<(u32, u64)> {
        let idx = self.inner.shared.index();
        idx.segs.iter().map(|(no, s)| (*no, s.size)).collect()
    }

    /// Where a live message's record starts (segment, offset).
    #[cfg(test)]
    pub(crate) fn location(&self, id: MsgId) -> Option<(u32, u64)> {
        let idx = self.inner.shared.index();
        idx.locate(id).map(|(loc, _)| (loc.seg, loc.off))
    }
}

/// Where drafts spill and how much they keep in memory.
pub(crate) fn draft_cfg(config: &SpoolConfig, shared: &Shared) -> DraftCfg {
    DraftCfg {
        open: shared.open_drafts.clone(),
        scratch_dir: config.dir.join("scratch"),
        limit: config.draft_memory_limit,
    }
}

/// Everything `Spool::open` does before starting the committer thread:
/// create the directories, remove stale scratch and spare files, scan and
/// repair. Tests drive the returned `Log` directly.
pub(crate) fn open_log(config: &SpoolConfig) -> Result<(Log, RecoveryReport), SpoolError> {
    // Under a file-size limit no segment may grow past it: every batch
    // after that would fail with EFBIG. Smaller segments roll in time.
    let file_limit = file_size_limit();
    let capped;
    let config = match file_limit {
        Some(limit) if limit < config.segment_size => {
            tracing::warn!(
                file_size_limit = limit,
                segment_size = config.segment_size,
                "spool.segment_size_capped"
            );
            capped = SpoolConfig {
                segment_size: limit,
                ..config.clone()
            };
            &capped
        }
        _ => config,
    };
    let dir = config.dir.clone();
    let scratch_dir = dir.join("scratch");
    std::fs::create_dir_all(&scratch_dir)?;
    std::fs::create_dir_all(dir.join("corrupt"))?;
    let stale = clean_scratch(&scratch_dir)?;
    if stale > 0 {
        tracing::info!(files = stale, "spool.scratch_cleaned");
    }
    // A spare that was being prepared (or was ready) when the last run
    // ended never held a record.
    let spares = spare::remove_stale(&dir)?;
    if spares > 0 {
        tracing::info!(files = spares, "spool.stale_spare_removed");
    }
    let outcome = recover::scan(&dir)?;
    let mut report = RecoveryReport {
        segments: outcome.segs.len(),
        ..RecoveryReport::default()
    };
    let shared = Arc::new(Shared {
        dir,
        index: Mutex::new(outcome.index),
        syncs: AtomicU64::new(0),
        faults: Faults::default(),
        ids: IdGen::new(outcome.max_id),
        closed: AtomicBool::new(false),
        open_drafts: Arc::default(),
        file_limit: AtomicU64::new(file_limit.unwrap_or(u64::MAX)),
    });
    let log = recover::repair(config, shared.clone(), outcome.segs, &mut report)?;
    report.messages = shared.index().msgs.len();
    Ok((log, report))
}

/// Bytes available to unprivileged users on the file system holding `dir`.
pub(crate) fn free_space(dir: &Path) -> io::Result<u64> {
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `c` is a valid NUL-terminated path and `st` a properly
    // sized, writable statvfs struct that outlives the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)] // the field widths differ between targets
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Read and verify the MSG record at `loc`; return its body.
/// Wakes the committer every `every` (at least 1 s) so that a segment
/// which settles while no mail flows is still compacted. Only inside a
/// tokio runtime; it holds a weak sender, so it never keeps the spool open
/// and stops at the first tick after the spool is gone.
fn spawn_reclaim_ticker(tx: &mpsc::UnboundedSender<Req>, every: std::time::Duration) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let weak = tx.downgrade();
    let every = every.max(std::time::Duration::from_secs(1));
    rt.spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(tx) = weak.upgrade() else {
                return;
            };
            let (reply, _) = oneshot::channel();
            if tx
                .send(Req {
                    op: Op::Reclaim,
                    reply,
                })
                .is_err()
            {
                return;
            }
        }
    });
}

pub(crate) fn read_msg_body(path: &Path, loc: Loc, nonce: u64) -> Result<Vec<u8>, SpoolError> {
    read_msg_body_from(&std::fs::File::open(path)?, path, loc, nonce)
}

/// [`read_msg_body`] from an already open segment (`path` names it in errors).
fn read_msg_body_from(
    file: &std::fs::File,
    path: &Path,
    loc: Loc,
    nonce: u64,
) -> Result<Vec<u8>, SpoolError> {
    let len =
        usize::try_from(loc.len).map_err(|_| SpoolError::Corrupt("record too large".into()))?;
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, loc.off)?;
    let ok = parse_record(&buf, nonce)
        .filter(|p| p.kind == Kind::Msg && p.total == len)
        .is_some();
    let start = usize::try_from(loc.body_off).unwrap_or(usize::MAX);
    let end = start.saturating_add(usize::try_from(loc.body_len).unwrap_or(usize::MAX));
    if !ok || start < REC_HDR_LEN || end > len {
        return Err(SpoolError::Corrupt(format!(
            "record at {}:{} does not verify",
            path.display(),
            loc.off
        )));
    }
    buf.truncate(end);
    buf.drain(..start);
    Ok(buf)
}
