//! The durable queue: a group-committed, append-only segment log (see
//! `design/spool.md` for why).
//!
//! # What it does
//! Sessions stream a body into a [`Draft`], then [`Spool::commit`] hands the
//! envelope and the body to the **committer**: one dedicated thread that owns
//! the active segment. It takes every request waiting in its channel, appends
//! them with as few `pwrite`s as possible, calls `fdatasync` **once**, and only
//! then completes every waiter. While a sync is in flight the next batch
//! gathers, so batches grow with load; a batch with a new message also waits
//! up to `commit_wait` (1 ms) while other sessions are still receiving bodies,
//! so one sync covers them too. Recipient outcomes
//! ([`Spool::update`]) and finished messages ([`Spool::finish`]) are records in
//! the same log, committed the same way. The index of live messages is kept in
//! memory and rebuilt at [`Spool::open`] by scanning the segments.
//!
//! # On-disk format, version 1
//! `dir/NNNNNNNN.log` (8 decimal digits, increasing) are the segments; the
//! highest number is the active one. Every integer is little-endian.
//!
//! ```text
//! segment header (24 bytes):
//!   magic "TERNSPOL" (8) | format version u32 = 1 | nonce u64 (random per segment)
//!   | header crc u32 = CRC32C(first 20 bytes)
//! record (16 + len bytes):
//!   magic "TREC" (4) | version u8 = 1 | kind u8 | flags u16 = 0 | len u32
//!   payload (len bytes)
//!   crc u32 = CRC32C(nonce as 8 bytes LE ++ record header ++ payload)
//! payloads:
//!   kind 1 MSG   : id u64 | envelope JSON length u32 | envelope JSON | body bytes (rest)
//!   kind 2 STATE : id u64 | JSON array of [recipient index, RcptStatus]
//!   kind 3 DONE  : id u64
//! ```
//! The segment nonce seeds every CRC, so a record quoted inside a message body
//! (for instance someone mailing a spool file) can never be mistaken for a
//! real record when recovery resynchronises after damage.
//!
//! **Preallocation.** A segment file may be longer than its records: the
//! spool prepares the next segment in the background as `dir/spare.prep`
//! (header, then real zeros up to `segment_size`, `fsync`, directory
//! `fsync`), and a roll renames it to `NNNNNNNN.log` and syncs the directory
//! before the first append (`spare.rs`). Appends then overwrite zeros in
//! place, so the hot-path `fdatasync` flushes data and no size metadata.
//! - The **logical end** of a segment is just past its last valid record.
//!   Everything after it is zeros in a healthy segment; since every record
//!   starts with the non-zero magic `TREC`, "only zeros from here to the end
//!   of the file" is unambiguous and is the normal end (not a torn tail, not
//!   damage). Recovery checks the whole remaining region; any non-zero byte
//!   in it falls under the usual torn-tail/corruption rules.
//! - A torn record before the zeros of the last segment is cut **in place**
//!   when the segment is preallocated (its bytes overwritten with zeros and
//!   synced, the file keeps its size); the writer resumes at its start. A
//!   growing segment (shorter than `segment_size`) is truncated as before.
//! - A segment whose header is damaged but whose nonce bytes still verify
//!   the first record's checksum is read with that nonce: it counts as
//!   damaged (rewritten, then moved to `corrupt/`), its records are kept.
//! - `*.prep` files never hold records: scans ignore them and
//!   [`Spool::open`] deletes them. A crash mid-preparation leaves only such a
//!   file; a crash mid-activation leaves either it or a segment made of a
//!   header and zeros (a clean, empty segment).
//! - When no spare is ready at a roll, the segment is created the old way
//!   (header written and synced, file grows); once a spare is ready the
//!   committer rolls early out of such a growing segment.
//!
//! The format version stays 1: headers and records are byte-for-byte
//! unchanged, and a reader of the original version 1 handles a preallocated
//! segment safely (it cuts the zeros of the last segment as a torn tail and
//! quarantines an older one, rewriting every valid record), so a downgrade
//! loses nothing; bumping the version would instead make such a reader treat
//! every segment as foreign.
//!
//! # Invariants
//! - A commit returns `Ok` only after the `fdatasync` that covered its record
//!   succeeded; the index only ever shows durable state.
//! - Exactly one `fdatasync` per batch on the hot path (a roll into a
//!   prepared segment adds one directory sync; a roll without one adds a
//!   sync of the new file's header and one of the directory). Preparing a
//!   spare costs one `fsync` on the helper thread, counted in
//!   [`Spool::sync_count`] (directory syncs are never counted).
//! - Space accounting (`RecoveryReport`, compaction) uses logical ends,
//!   never file sizes.
//! - A message may appear in several segments (compaction copies it forward,
//!   then deletes the old segment): the newest copy wins; a DONE anywhere wins.
//! - A segment is deleted only when none of its messages is live **and** every
//!   older segment its STATE/DONE/copy records refer to is already gone, so a
//!   deletion can never resurrect a finished message or forget an outcome.
//!   A damaged segment stays in the index (so this keeps holding) until it
//!   has actually been moved to `corrupt/`; it is moved, never deleted.
//! - A batch whose write or `fdatasync` failed is answered with an error
//!   and its segment is *sealed*: cut back to the last synced record, the
//!   cut synced, never appended to again. After a failed `fdatasync` the
//!   kernel may have dropped the pages it could not write, so nothing of
//!   that batch is ever trusted or synced again as if it were durable. While
//!   the seal itself fails (the storage is still failing) no later batch
//!   commits; the first one after the storage recovers seals, rolls to a
//!   fresh segment and commits, without a restart.
//! - Under a file-size limit (`RLIMIT_FSIZE`) no segment is larger than the
//!   limit: `segment_size` is lowered to it at open, a message whose record
//!   cannot fit is refused before its batch (`ErrorKind::FileTooLarge`), and
//!   a batch larger than the limit is written in parts.
//! - One request's own failure (its scratch file cannot be read back, its
//!   record would exceed the 32-bit length) fails only that request, never
//!   the batch it is in. Payloads are encoded in the caller's task, so the
//!   committer and the index lock only look things up and write.
//!
//! # What it does not do
//! It does not schedule, route or deliver; it does not enforce the message
//! size limit (the session does, while reading; the spool only refuses what
//! the format cannot hold, a payload of 4 GiB or more); it does not fsync
//! scratch files (they are only buffers: a crash before commit loses nothing
//! that was acknowledged).
//!
//! # Errors
//! [`SpoolError::Io`] for any file-system failure (a failed batch is cut
//! away and the spool keeps serving; a message too large for a record, or
//! for a segment under the file-size limit, gets `ErrorKind::FileTooLarge`
//! before it reaches the log),
//! [`SpoolError::Corrupt`] when a record read back does not verify,
//! [`SpoolError::NotFound`] for an unknown or finished message,
//! [`SpoolError::Closed`] after [`Spool::close`].

mod committer;
mod compact;
mod draft;
mod envelope;
mod index;
mod log;
mod readonly;
mod record;
mod recover;
mod spare;
mod writer;

#[cfg(test)]
pub(crate) mod tests;
#[cfg(test)]
mod tests_faults;
#[cfg(test)]
mod tests_prealloc;
#[cfg(test)]
mod tests_prop;
#[cfg(test)]
mod tests_recovery;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use draft::Draft;
pub use envelope::{Envelope, RcptStatus, Recipient, Route, domain_of};
pub use log::{Outcome, Spool};
pub use readonly::{read_body_read_only, scan_read_only};
pub use writer::Faults;

/// The largest message the spool can take under the process's file-size
/// limit (`ulimit -f`, `prlimit --fsize`, systemd's `LimitFSIZE=`), if it
/// has one: a record also holds its envelope (recipients included), so a
/// margin is kept for it. What is larger can never be stored, and is better
/// refused for good (`552 5.3.4`, announced by EHLO's SIZE) than deferred
/// until the sender gives up.
pub fn largest_storable_message() -> Option<u64> {
    /// Room for the record's header and envelope; a quarter of a small
    /// limit.
    const ENVELOPE_ROOM: u64 = 1 << 20;
    writer::file_size_limit().map(|limit| limit - ENVELOPE_ROOM.min(limit / 4))
}

/// A queue identifier: 44 bits of milliseconds since 2020-01-01 UTC, then a
/// 20-bit counter. Unique across restarts (the generator starts above the
/// highest id found on disk) and monotone within a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MsgId(pub u64);

impl fmt::Display for MsgId {
    /// 16 uppercase hex digits: fixed width, so ids sort as strings too.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016X}", self.0)
    }
}

/// Error for a string that is not 1 to 16 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid queue id {0:?}")]
pub struct ParseMsgIdError(pub String);

impl FromStr for MsgId {
    type Err = ParseMsgIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok = !s.is_empty() && s.len() <= 16 && s.bytes().all(|b| b.is_ascii_hexdigit());
        if !ok {
            return Err(ParseMsgIdError(s.to_string()));
        }
        u64::from_str_radix(s, 16)
            .map(MsgId)
            .map_err(|_| ParseMsgIdError(s.to_string()))
    }
}

/// 2020-01-01T00:00:00Z in unix milliseconds.
const ID_EPOCH_MS: u64 = 1_577_836_800_000;
const ID_COUNTER_BITS: u32 = 20;

/// Lock-free id generator: `max(last + 1, now << 20)`.
pub(crate) struct IdGen(AtomicU64);

impl IdGen {
    pub(crate) fn new(floor: u64) -> Self {
        IdGen(AtomicU64::new(floor))
    }

    pub(crate) fn next(&self) -> MsgId {
        let now_ms = u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0);
        let now = now_ms.saturating_sub(ID_EPOCH_MS) << ID_COUNTER_BITS;
        let mut cur = self.0.load(Ordering::Relaxed);
        loop {
            let cand = now.max(cur.wrapping_add(1));
            match self
                .0
                .compare_exchange_weak(cur, cand, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return MsgId(cand),
                Err(actual) => cur = actual,
            }
        }
    }
}

/// Where the spool lives and how it sizes things.
#[derive(Clone, Debug)]
pub struct SpoolConfig {
    /// The spool directory (segments, `scratch/`, `corrupt/`).
    pub dir: PathBuf,
    /// Roll to a new segment once the active one would exceed this (a single
    /// batch may overshoot it; one huge message gets a segment of its own).
    pub segment_size: u64,
    /// A draft keeps this many bytes in memory before spilling to a scratch file.
    pub draft_memory_limit: usize,
    /// A segment is compacted only once it has been closed this long (or,
    /// after a restart, the spool open this long): the messages still in
    /// flight when it closed are delivered by then, so it dies whole and is
    /// deleted instead of having them copied forward.
    pub compact_after: Duration,
    /// Longest a batch holding a new message waits for the messages other
    /// sessions are still receiving, to share one `fdatasync` with them.
    pub commit_wait: Duration,
}

impl SpoolConfig {
    /// The default `compact_after`.
    pub const COMPACT_AFTER: Duration = Duration::from_secs(30);
    /// The default `commit_wait`: about one `fdatasync` of a small batch on
    /// an SSD, so a batch waits at most as long as the sync it saves.
    pub const COMMIT_WAIT: Duration = Duration::from_millis(1);

    /// `dir` with the default sizes (64 MiB segments, 256 KiB in-memory drafts).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        SpoolConfig {
            dir: dir.into(),
            segment_size: 64 * 1024 * 1024,
            draft_memory_limit: 256 * 1024,
            compact_after: SpoolConfig::COMPACT_AFTER,
            commit_wait: SpoolConfig::COMMIT_WAIT,
        }
    }
}

/// What [`Spool::open`] found and repaired.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Live (unfinished) messages in the index after recovery.
    pub messages: usize,
    /// Segment files found at start-up.
    pub segments: usize,
    /// Torn tails cut off the last segment (0 or 1).
    pub torn_tails_cut: usize,
    /// Segments moved to `dir/corrupt/` (paths after the move).
    pub corrupt_segments: Vec<PathBuf>,
    /// Bytes of damaged or torn records dropped.
    pub bytes_lost: u64,
}

/// Spool failures. `Display` is meant for logs, not for SMTP clients.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("spool data corrupt: {0}")]
    Corrupt(String),
    #[error("no live message {0} in the spool")]
    NotFound(MsgId),
    #[error("spool is closed")]
    Closed,
}

impl SpoolError {
    /// A copy for every waiter of a failed batch (`io::Error` is not `Clone`).
    pub(crate) fn duplicate(&self) -> SpoolError {
        match self {
            SpoolError::Io(e) => SpoolError::Io(committer::copy_io_error(e)),
            SpoolError::Corrupt(s) => SpoolError::Corrupt(s.clone()),
            SpoolError::NotFound(id) => SpoolError::NotFound(*id),
            SpoolError::Closed => SpoolError::Closed,
        }
    }
}
