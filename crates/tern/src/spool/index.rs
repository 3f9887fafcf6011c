//! The in-memory index: live messages (envelope with current statuses and the
//! location of their MSG record) and per-segment bookkeeping for reclaiming.
//!
//! Invariants: `SegInfo::live`/`live_bytes` count exactly the entries whose
//! `loc.seg` is that segment; `refs` of segment S lists older segments that S
//! holds STATE/DONE/copy records about, so S must outlive them.
//! Only the committer (and recovery, before it starts) mutates the index, so
//! the index only ever reflects durable records.
//! Does no I/O. Errors: none (unknown ids are reported as `false`).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::{Envelope, MsgId, RcptStatus};

/// Where a MSG record lives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Loc {
    pub seg: u32,
    /// File offset of the record header.
    pub off: u64,
    /// Whole record length (header + payload + CRC).
    pub len: u64,
    /// Offset of the body within the record.
    pub body_off: u64,
    pub body_len: u64,
}

#[derive(Clone, Debug)]
pub(crate) struct Entry {
    pub env: Envelope,
    pub loc: Loc,
}

#[derive(Clone, Debug, Default)]
pub(crate) struct SegInfo {
    pub nonce: u64,
    /// The logical end: bytes up to the end of the last record (a
    /// preallocated file is longer; its zero tail holds nothing).
    pub size: u64,
    pub live: usize,
    pub live_bytes: u64,
    /// Older segments this one must outlive.
    pub refs: BTreeSet<u32>,
}

#[derive(Debug, Default)]
pub(crate) struct Index {
    pub msgs: HashMap<MsgId, Entry>,
    pub segs: BTreeMap<u32, SegInfo>,
}

impl Index {
    fn unlink(&mut self, loc: Loc) {
        if let Some(s) = self.segs.get_mut(&loc.seg) {
            s.live = s.live.saturating_sub(1);
            s.live_bytes = s.live_bytes.saturating_sub(loc.len);
        }
    }

    fn add_ref(&mut self, from: u32, to: u32) {
        if from != to {
            self.segs.entry(from).or_default().refs.insert(to);
        }
    }

    /// A MSG record (new message or a copy that supersedes an older one).
    pub fn apply_msg(&mut self, id: MsgId, env: Envelope, loc: Loc) {
        if let Some(old) = self.msgs.remove(&id) {
            self.unlink(old.loc);
            self.add_ref(loc.seg, old.loc.seg);
        }
        let s = self.segs.entry(loc.seg).or_default();
        s.live += 1;
        s.live_bytes += loc.len;
        self.msgs.insert(id, Entry { env, loc });
    }

    /// A STATE record in segment `seg`. Out-of-range indices are ignored
    /// (the committer never writes them). False if the message is not live.
    pub fn apply_state(&mut self, id: MsgId, changes: Vec<(usize, RcptStatus)>, seg: u32) -> bool {
        let Some(e) = self.msgs.get_mut(&id) else {
            return false;
        };
        for (i, st) in changes {
            if let Some(r) = e.env.recipients.get_mut(i) {
                r.status = st;
            }
        }
        let home = e.loc.seg;
        self.add_ref(seg, home);
        true
    }

    /// A DONE record in segment `seg`. False if the message was not live.
    pub fn apply_done(&mut self, id: MsgId, seg: u32) -> bool {
        let Some(old) = self.msgs.remove(&id) else {
            return false;
        };
        self.unlink(old.loc);
        self.add_ref(seg, old.loc.seg);
        true
    }

    /// Segments that can be deleted now, `active` aside: no live message,
    /// and every segment they must outlive already gone.
    pub fn dead_segments(&self, active: u32) -> Vec<u32> {
        self.segs
            .iter()
            .filter(|(no, s)| {
                **no != active && s.live == 0 && s.refs.iter().all(|r| !self.segs.contains_key(r))
            })
            .map(|(no, _)| *no)
            .collect()
    }

    /// Live messages, oldest (lowest id) first.
    pub fn live(&self) -> Vec<(MsgId, Envelope)> {
        let mut v: Vec<_> = self.msgs.iter().map(|(k, e)| (*k, e.env.clone())).collect();
        v.sort_by_key(|(k, _)| *k);
        v
    }

    /// Location and segment nonce of a live message.
    pub fn locate(&self, id: MsgId) -> Option<(Loc, u64)> {
        let e = self.msgs.get(&id)?;
        let nonce = self.segs.get(&e.loc.seg)?.nonce;
        Some((e.loc, nonce))
    }
}
