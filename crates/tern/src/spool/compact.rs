//! Reclaiming space: delete dead segments, copy the few live messages of a
//! mostly-dead segment forward.
//!
//! Invariants:
//! - A segment is deleted only if it is not the active one, holds no live
//!   message, and every segment in its `refs` is already gone. Deletions go in
//!   rounds with a directory fsync in between, so a segment that outlives
//!   another on purpose also does so on disk after a crash.
//! - Compaction writes the copies (same id, current statuses, same body) and
//!   syncs them **before** the old segment becomes deletable; a crash in
//!   between leaves two copies, and recovery keeps the newest.
//! - Only segments whose `refs` are all gone are compacted, so the copy is
//!   always followed by the deletion (never wasted work).
//!
//! Runs on the committer thread, only when no request is waiting, so it never
//! adds a sync to a waiting commit's batch.
//! Errors: logged (`spool.reclaim_*` events) and retried later; never fatal.

use super::committer::Log;
use super::draft::Body;
use super::index::Loc;
use super::log::read_msg_body;
use super::record::{Kind, msg_head};
use super::writer::{Apply, OutRec, segment_path, sync_dir};

/// Compact a segment once less than this fraction (1/N) of it is live.
const COMPACT_LIVE_DIVISOR: u64 = 2;

impl Log {
    /// Delete what is dead, then compact at most one segment.
    pub fn reclaim(&mut self) {
        self.delete_dead();
        if let Some(seg) = self.pick_compaction() {
            match self.compact(seg) {
                Ok(n) => {
                    tracing::info!(segment = seg, messages = n, "spool.compacted");
                    self.delete_dead();
                }
                Err(e) => {
                    tracing::warn!(segment = seg, error = %e, "spool.reclaim_compact_failed");
                    self.skip_compact.insert(seg);
                }
            }
        }
    }

    fn delete_dead(&mut self) {
        loop {
            let victims: Vec<u32> = {
                let idx = self.shared.index();
                idx.segs
                    .iter()
                    .filter(|(no, s)| {
                        **no != self.active.no
                            && s.live == 0
                            && s.refs.iter().all(|r| !idx.segs.contains_key(r))
                    })
                    .map(|(no, _)| *no)
                    .collect()
            };
            if victims.is_empty() {
                return;
            }
            for no in victims {
                let path = segment_path(&self.shared.dir, no);
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        tracing::warn!(segment = no, error = %e, "spool.reclaim_delete_failed");
                        return;
                    }
                }
                self.shared.index().segs.remove(&no);
                tracing::info!(segment = no, "spool.segment_deleted");
            }
            // The next round may delete segments that had to outlive these.
            if let Err(e) = sync_dir(&self.shared.dir) {
                tracing::warn!(error = %e, "spool.reclaim_dirsync_failed");
                return;
            }
        }
    }

    fn pick_compaction(&self) -> Option<u32> {
        let idx = self.shared.index();
        idx.segs
            .iter()
            .find(|(no, s)| {
                **no != self.active.no
                    && !self.skip_compact.contains(no)
                    && s.live > 0
                    && s.live_bytes * COMPACT_LIVE_DIVISOR < s.size
                    && s.refs.iter().all(|r| !idx.segs.contains_key(r))
            })
            .map(|(no, _)| *no)
    }

    /// Copy the live messages of `seg` into the active segment (one sync).
    fn compact(&mut self, seg: u32) -> Result<usize, super::SpoolError> {
        let (nonce, moves) = {
            let idx = self.shared.index();
            let nonce = idx.segs.get(&seg).map_or(0, |s| s.nonce);
            let moves: Vec<_> = idx
                .msgs
                .iter()
                .filter(|(_, e)| e.loc.seg == seg)
                .map(|(id, e)| (*id, e.env.clone(), e.loc))
                .collect();
            (nonce, moves)
        };
        let path = segment_path(&self.shared.dir, seg);
        let mut recs = Vec::with_capacity(moves.len());
        for (id, env, loc) in moves {
            let body = read_msg_body(&path, loc, nonce)?;
            recs.push(OutRec {
                id,
                kind: Kind::Msg,
                head: msg_head(id, &env).map_err(super::SpoolError::Corrupt)?,
                body: Some(Body::Mem(body)),
                apply: Apply::Msg(env),
                loc: Loc::default(),
            });
        }
        let n = recs.len();
        self.commit_housekeeping(&mut recs)?;
        Ok(n)
    }
}
