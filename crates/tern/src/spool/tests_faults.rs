//! Failures that must stay contained: one bad request in a batch, a
//! quarantine whose move fails, read-only scans racing compaction.

use std::path::Path;
use std::sync::Arc;

use tokio::sync::oneshot;

use super::committer::{Log, Op, Req};
use super::draft::{Body, Draft, Scratch};
use super::log::{draft_cfg, open_log};
use super::readonly;
use super::record::{self, Kind};
use super::recover::{FAIL_MOVES, list_segments};
use super::spare::SPARE_NAME;
use super::tests::{commit_body, config, envelope, msg_record, reopen, wait_until};
use super::writer::segment_path;
use super::*;

const NONCE: u64 = 0xFA11_0C0D;

fn write_segment(path: &Path, records: &[&[u8]], size: usize) {
    let mut buf = record::segment_header(NONCE).to_vec();
    for r in records {
        buf.extend_from_slice(r);
    }
    buf.resize(buf.len().max(size), 0);
    std::fs::write(path, &buf).unwrap();
}

type Reply = oneshot::Receiver<Result<(), SpoolError>>;

fn req(op: Op) -> (Req, Reply) {
    let (reply, rx) = oneshot::channel();
    (Req { op, reply }, rx)
}

fn msg_req(log: &Log, body: Body) -> (MsgId, Req, Reply) {
    let id = log.shared.ids.next();
    let mut env = envelope(1);
    env.size = body.len();
    let head = record::msg_head(id, &env).unwrap();
    let (r, rx) = req(Op::Msg {
        id,
        env: Box::new(env),
        head,
        body,
    });
    (id, r, rx)
}

fn answer(mut rx: Reply) -> Result<(), SpoolError> {
    rx.try_recv().expect("answered")
}

/// A batch with a scratch file that turns out shorter than its draft (read
/// error half-way, after part of it was flushed) and a record too large for
/// the 32-bit length: only those two requests fail; the others are written,
/// the segment is not poisoned, and what was flushed of the failed record is
/// gone before the sync (recovery finds a clean end, no torn tail).
async fn bad_records_fail_alone(prealloc: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let size: u64 = 16 << 20;
    let cfg = SpoolConfig {
        segment_size: size,
        ..config(tmp.path())
    };
    if prealloc {
        write_segment(&segment_path(tmp.path(), 1), &[], size as usize);
    }
    let (mut log, _) = open_log(&cfg).unwrap();
    assert_eq!(log.active.prealloc, prealloc);
    let (seg, start) = (log.active.no, log.active.end);
    let dcfg = Arc::new(draft_cfg(&cfg, &log.shared));

    let mut d = Draft::new(dcfg.clone());
    let big = vec![b'B'; 6 << 20];
    d.write(&big).await.unwrap();
    let short = d.take_body().await.unwrap();
    let Body::File(s) = &short else {
        panic!("spilled")
    };
    // Someone cut the scratch file: the first 4 MiB piece reads (and is
    // flushed to the segment), the second does not.
    s.file.set_len(5 << 20).unwrap();
    let huge_path = tmp.path().join("scratch").join("huge.tmp");
    let huge_file = std::fs::File::create(&huge_path).unwrap();
    huge_file.set_len(5 << 30).unwrap(); // sparse
    let huge = Body::File(Scratch {
        path: huge_path,
        file: huge_file,
        len: 5 << 30,
    });

    let (a, ra, rxa) = msg_req(&log, Body::Mem(b"alpha".to_vec()));
    let (_, rb, rxb) = msg_req(&log, short);
    let (c, rc, rxc) = msg_req(&log, Body::Mem(b"charlie".to_vec()));
    let (_, rd, rxd) = msg_req(&log, huge);
    let (e, re, rxe) = msg_req(&log, Body::Mem(b"echo".to_vec()));
    let syncs = log.shared.syncs.load(std::sync::atomic::Ordering::Relaxed);
    assert!(!log.process(vec![ra, rb, rc, rd, re]));

    assert!(answer(rxa).is_ok());
    let eb = answer(rxb).unwrap_err();
    assert!(
        matches!(&eb, SpoolError::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof),
        "{eb}"
    );
    assert!(answer(rxc).is_ok());
    let ed = answer(rxd).unwrap_err();
    assert!(
        matches!(&ed, SpoolError::Io(io) if io.kind() == std::io::ErrorKind::FileTooLarge),
        "{ed}"
    );
    assert!(answer(rxe).is_ok());
    assert_eq!(
        log.shared.syncs.load(std::sync::atomic::Ordering::Relaxed),
        syncs + 1,
        "one sync for the batch"
    );
    assert!(!log.active.poisoned);
    assert_eq!(log.active.no, seg);
    let end = log.active.end;
    assert!(end > start && end < start + 4096, "only the small records");
    let ids: Vec<_> = log.shared.index().live().into_iter().map(|x| x.0).collect();
    assert_eq!(ids, vec![a, c, e]);
    assert_eq!(
        std::fs::read_dir(tmp.path().join("scratch"))
            .unwrap()
            .count(),
        0,
        "scratch files removed"
    );
    let bytes = std::fs::read(segment_path(tmp.path(), seg)).unwrap();
    if prealloc {
        assert_eq!(bytes.len() as u64, size, "keeps its preallocation");
    } else {
        assert_eq!(bytes.len() as u64, end, "cut back to the logical end");
    }
    assert!(
        bytes[end as usize..].iter().all(|&x| x == 0),
        "no leftover of the failed record"
    );
    drop(log);

    let (spool, rep) = Spool::open(cfg).unwrap();
    assert_eq!(rep.torn_tails_cut, 0);
    assert!(rep.corrupt_segments.is_empty());
    assert_eq!(rep.messages, 3);
    assert_eq!(spool.read_body(a).await.unwrap(), b"alpha");
    assert_eq!(spool.read_body(c).await.unwrap(), b"charlie");
    assert_eq!(spool.read_body(e).await.unwrap(), b"echo");
}

#[tokio::test]
async fn bad_records_fail_alone_in_a_growing_segment() {
    bad_records_fail_alone(false).await;
}

#[tokio::test]
async fn bad_records_fail_alone_in_a_preallocated_segment() {
    bad_records_fail_alone(true).await;
}

#[tokio::test]
async fn oversized_message_is_refused_before_it_joins_a_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(config(tmp.path())).unwrap();
    let a = commit_body(&spool, envelope(1), b"before").await.unwrap();
    let segs = spool.segment_numbers();
    let syncs = spool.sync_count();
    let mut d = spool.draft();
    d.grow_sparse(4 << 30).await.unwrap();
    let e = spool.commit(envelope(1), d).await.unwrap_err();
    assert!(
        matches!(&e, SpoolError::Io(io) if io.kind() == std::io::ErrorKind::FileTooLarge),
        "{e}"
    );
    assert_eq!(spool.sync_count(), syncs, "never reached the log");
    assert_eq!(
        std::fs::read_dir(tmp.path().join("scratch"))
            .unwrap()
            .count(),
        0
    );
    // The active segment was not poisoned: the next commit needs no roll.
    let b = commit_body(&spool, envelope(1), b"after").await.unwrap();
    assert_eq!(spool.segment_numbers(), segs);
    let (spool, rep) = reopen(spool, config(tmp.path())).await;
    assert_eq!(rep.messages, 2);
    assert_eq!(spool.read_body(a).await.unwrap(), b"before");
    assert_eq!(spool.read_body(b).await.unwrap(), b"after");
}

/// Segment 1 is damaged and holds message 10, finished by the DONE in
/// segment 2. If moving segment 1 to `corrupt/` fails, it must stay in the
/// index, so segment 2 (which must outlive it) is not deleted; otherwise
/// message 10 comes back at the next start.
#[tokio::test]
async fn failed_quarantine_move_keeps_protecting_newer_segments() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let garbage = b"TREC-not-a-record-at-all";
    write_segment(
        &segment_path(&dir, 1),
        &[
            &msg_record(10, b"finished", NONCE),
            garbage,
            &msg_record(11, b"keep", NONCE),
        ],
        0,
    );
    let done = record::encode(Kind::Done, &10u64.to_le_bytes(), NONCE).unwrap();
    write_segment(&segment_path(&dir, 2), &[&done], 0);
    write_segment(&segment_path(&dir, 3), &[], 0);

    FAIL_MOVES.lock().unwrap().push(dir.clone());
    let opened = Spool::open(config(&dir));
    FAIL_MOVES.lock().unwrap().retain(|d| *d != dir);
    let (spool, rep) = opened.unwrap();
    assert!(rep.corrupt_segments.is_empty(), "the move failed");
    assert!(segment_path(&dir, 1).exists());
    assert_eq!(spool.segment_numbers(), vec![1, 2, 3], "still protecting 2");
    assert!(spool.get(MsgId(10)).is_none());
    assert_eq!(spool.read_body(MsgId(11)).await.unwrap(), b"keep");

    // Reclaiming (after a batch) moves the damaged segment now that moves
    // work, never deletes it, and only then deletes segment 2.
    commit_body(&spool, envelope(1), b"x").await.unwrap();
    wait_until(|| {
        let now = list_segments(&dir).unwrap();
        !now.contains(&1) && !now.contains(&2)
    })
    .await;
    assert!(dir.join("corrupt").join("00000001.log").exists());
    let (spool, rep) = reopen(spool, config(&dir)).await;
    assert!(rep.corrupt_segments.is_empty());
    assert!(spool.get(MsgId(10)).is_none(), "finished stays finished");
    assert_eq!(spool.read_body(MsgId(11)).await.unwrap(), b"keep");
}

/// One committed message, spool closed. Returns its id and segment.
async fn one_message(dir: &Path, body: &[u8]) -> (MsgId, u32) {
    let (spool, _) = Spool::open(config(dir)).unwrap();
    let id = commit_body(&spool, envelope(1), body).await.unwrap();
    spool.close().await;
    let segs = list_segments(dir).unwrap();
    assert_eq!(segs.len(), 1);
    (id, segs[0])
}

/// What compaction does, seen from outside: copy forward, delete the old.
fn compact_by_hand(dir: &Path, from: u32) {
    std::fs::copy(segment_path(dir, from), segment_path(dir, from + 1)).unwrap();
    std::fs::remove_file(segment_path(dir, from)).unwrap();
}

#[tokio::test]
async fn read_only_scan_ignores_vanished_segments_and_spares() {
    let tmp = tempfile::tempdir().unwrap();
    let (m, seg) = one_message(tmp.path(), b"listed").await;
    // A segment listed but gone when read (deleted by compaction).
    std::os::unix::fs::symlink("nowhere", segment_path(tmp.path(), seg + 5)).unwrap();
    // Spares never hold records, even when they look like segments.
    // Another spool, whose message must have another id: two fresh spools
    // can hand out the same one within a millisecond.
    let (other, x, xseg) = loop {
        let other = tempfile::tempdir().unwrap();
        let (x, xseg) = one_message(other.path(), b"not in this spool").await;
        if x != m {
            break (other, x, xseg);
        }
    };
    let bytes = std::fs::read(segment_path(other.path(), xseg)).unwrap();
    std::fs::write(tmp.path().join(SPARE_NAME), &bytes).unwrap();
    std::fs::write(tmp.path().join("00000009.log.prep"), &bytes).unwrap();

    let ids: Vec<_> = scan_read_only(tmp.path())
        .unwrap()
        .into_iter()
        .map(|x| x.0)
        .collect();
    assert_eq!(ids, vec![m]);
    assert_eq!(read_body_read_only(tmp.path(), m).unwrap(), b"listed");
    assert!(matches!(
        read_body_read_only(tmp.path(), x),
        Err(SpoolError::NotFound(_))
    ));
}

#[tokio::test]
async fn read_only_scan_rescans_when_compaction_moves_a_message() {
    let tmp = tempfile::tempdir().unwrap();
    let (m, seg) = one_message(tmp.path(), b"moved").await;
    let mut first = true;
    let index = readonly::scan_index(tmp.path(), &mut |no| {
        if no == seg && first {
            first = false;
            compact_by_hand(tmp.path(), seg);
        }
    })
    .unwrap();
    assert!(!first);
    let (loc, _) = index.locate(m).expect("found in the new segment");
    assert_eq!(loc.seg, seg + 1);
}

#[tokio::test]
async fn read_only_body_read_rescans_when_its_segment_vanished() {
    let tmp = tempfile::tempdir().unwrap();
    let (m, seg) = one_message(tmp.path(), b"still here").await;
    // Hook calls: reading the segment for the scan, then just before the
    // body is read: compaction strikes in between.
    let mut calls = 0;
    let body = readonly::read_body(tmp.path(), m, &mut |_| {
        calls += 1;
        if calls == 2 {
            compact_by_hand(tmp.path(), seg);
        }
    })
    .unwrap();
    assert_eq!(body, b"still here");
    assert!(calls > 2);
    assert!(!segment_path(tmp.path(), seg).exists());
}

#[tokio::test]
async fn unreadable_scratch_fails_only_its_own_commit() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(config(tmp.path())).unwrap();
    let a = commit_body(&spool, envelope(1), b"before").await.unwrap();
    let segs = spool.segment_numbers();
    let mut d = spool.draft();
    d.write(&vec![b's'; 10_000]).await.unwrap();
    // Flushes the write tokio may still have in flight, which would
    // otherwise undo the truncation below.
    d.grow_sparse(0).await.unwrap();
    let scratch: Vec<_> = std::fs::read_dir(tmp.path().join("scratch"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(scratch.len(), 1, "spilled");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&scratch[0])
        .unwrap()
        .set_len(100)
        .unwrap();
    assert!(spool.commit(envelope(1), d).await.is_err());
    assert!(!scratch[0].exists());
    // Not a segment failure: the active segment was not poisoned, so the
    // next commit goes into the same segment.
    let b = commit_body(&spool, envelope(1), b"after").await.unwrap();
    assert_eq!(spool.segment_numbers(), segs);
    let (spool, rep) = reopen(spool, config(tmp.path())).await;
    assert_eq!((rep.messages, rep.torn_tails_cut), (2, 0));
    assert_eq!(spool.read_body(a).await.unwrap(), b"before");
    assert_eq!(spool.read_body(b).await.unwrap(), b"after");
}

#[test]
fn a_segment_left_by_a_failed_roll_does_not_block_the_next_one() {
    use super::writer::SegmentWriter;
    use std::sync::atomic::AtomicU64;
    let dir = tempfile::tempdir().unwrap();
    let syncs = AtomicU64::new(0);
    // What a roll that hit a full disk could leave: an empty file, or a
    // header alone. Neither can hold a committed record: it is replaced.
    std::fs::write(segment_path(dir.path(), 2), b"").unwrap();
    let w = SegmentWriter::create(dir.path(), 2, &syncs).expect("an empty leftover is replaced");
    assert_eq!(w.no, 2);
    drop(w);
    let header_only = std::fs::read(segment_path(dir.path(), 2)).unwrap();
    assert_eq!(header_only.len() as u64, record::SEG_HDR_LEN);
    std::fs::write(segment_path(dir.path(), 3), &header_only).unwrap();
    SegmentWriter::create(dir.path(), 3, &syncs).expect("a header-only leftover is replaced");
    // A segment with anything past its header is never replaced.
    let mut longer = header_only.clone();
    longer.push(b'T');
    std::fs::write(segment_path(dir.path(), 4), &longer).unwrap();
    let e = SegmentWriter::create(dir.path(), 4, &syncs).expect_err("a segment with data is kept");
    assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
    assert_eq!(std::fs::read(segment_path(dir.path(), 4)).unwrap(), longer);
}

/// Whether segment `no` of `dir` holds `needle` anywhere (live record or not).
fn segment_holds(dir: &Path, no: u32, needle: &[u8]) -> bool {
    let bytes = std::fs::read(segment_path(dir, no)).unwrap_or_default();
    bytes.windows(needle.len()).any(|w| w == needle)
}

/// The fsyncgate rule: a batch whose `fdatasync` failed is answered with an
/// error, its records are cut from the segment (durably), the segment is
/// never appended to again, the next batch works in a fresh one, and a
/// restart does not bring the failed record back.
#[tokio::test]
async fn a_failed_fdatasync_is_never_trusted_and_the_next_batch_works() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (spool, _) = Spool::open(config(dir)).unwrap();
    let a = commit_body(&spool, envelope(1), b"acknowledged")
        .await
        .unwrap();
    let (seg, end) = *spool.segment_sizes().last().unwrap();

    spool.faults().fail_syncs(1);
    let e = commit_body(&spool, envelope(1), b"never-synced")
        .await
        .unwrap_err();
    assert!(
        matches!(&e, SpoolError::Io(io) if io.raw_os_error() == Some(libc::EIO)),
        "{e}"
    );
    assert!(spool.get(a).is_some());
    assert_eq!(spool.live().len(), 1, "nothing of the failed batch is live");
    assert_eq!(
        std::fs::metadata(segment_path(dir, seg)).unwrap().len(),
        end,
        "sealed at its last synced record"
    );
    assert!(!segment_holds(dir, seg, b"never-synced"));

    let c = commit_body(&spool, envelope(1), b"after the fault")
        .await
        .unwrap();
    let (c_seg, _) = spool.location(c).unwrap();
    assert!(c_seg > seg, "the failed segment is not appended to again");
    assert_eq!(spool.read_body(c).await.unwrap(), b"after the fault");

    let (spool, rep) = reopen(spool, config(dir)).await;
    assert_eq!(rep.torn_tails_cut, 0);
    let ids: Vec<_> = spool.live().into_iter().map(|x| x.0).collect();
    assert_eq!(ids, vec![a, c], "the unsynced record is not resurrected");
    assert_eq!(spool.read_body(a).await.unwrap(), b"acknowledged");
}

/// While the storage keeps failing, even the seal of the failed batch
/// fails: its bytes are still in the segment. No later batch may commit
/// until the seal succeeds (otherwise a restart would find the failed
/// record before acknowledged ones); once it does, commits resume without
/// a restart and the failed record is gone for good.
#[tokio::test]
async fn no_batch_commits_until_the_failed_one_is_sealed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (spool, _) = Spool::open(config(dir)).unwrap();
    let a = commit_body(&spool, envelope(1), b"first").await.unwrap();
    let seg = *spool.segment_numbers().last().unwrap();

    spool.faults().fail_syncs(1);
    spool.faults().fail_seals(2);
    assert!(
        commit_body(&spool, envelope(1), b"failed-batch")
            .await
            .is_err()
    );
    assert!(
        segment_holds(dir, seg, b"failed-batch"),
        "the seal failed: the bytes are still there"
    );
    // The seal is retried first and fails again: this batch fails too,
    // without a segment of its own.
    let e = commit_body(&spool, envelope(1), b"second-try")
        .await
        .unwrap_err();
    assert!(
        matches!(&e, SpoolError::Io(io) if io.raw_os_error() == Some(libc::EIO)),
        "{e}"
    );
    assert_eq!(
        spool.segment_numbers(),
        vec![seg],
        "no roll before the seal"
    );
    // Storage is back: the seal succeeds, the segment rolls, this commits.
    let d = commit_body(&spool, envelope(1), b"storage back")
        .await
        .unwrap();
    assert!(!segment_holds(dir, seg, b"failed-batch"));
    assert!(spool.location(d).unwrap().0 > seg);

    let (spool, rep) = reopen(spool, config(dir)).await;
    assert_eq!(rep.torn_tails_cut, 0);
    let ids: Vec<_> = spool.live().into_iter().map(|x| x.0).collect();
    assert_eq!(ids, vec![a, d]);
}

/// A spool that stops while the failed batch is still unsealed seals it on
/// the way out, so the next start does not deliver a message that was
/// answered with an error.
#[tokio::test]
async fn an_unsealed_segment_is_sealed_when_the_spool_closes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (spool, _) = Spool::open(config(dir)).unwrap();
    let a = commit_body(&spool, envelope(1), b"kept").await.unwrap();
    let seg = *spool.segment_numbers().last().unwrap();
    spool.faults().fail_syncs(1);
    spool.faults().fail_seals(1);
    assert!(
        commit_body(&spool, envelope(1), b"answered-451")
            .await
            .is_err()
    );
    assert!(segment_holds(dir, seg, b"answered-451"));
    let (spool, rep) = reopen(spool, config(dir)).await;
    assert!(!segment_holds(dir, seg, b"answered-451"));
    assert_eq!(rep.torn_tails_cut, 0);
    let ids: Vec<_> = spool.live().into_iter().map(|x| x.0).collect();
    assert_eq!(ids, vec![a]);
}

/// Under a file-size limit (`ulimit -f`): a message whose record cannot fit
/// any segment fails alone before it joins a batch, and a batch of messages
/// that fit one by one but not together is written in parts, each in a
/// segment no longer than the limit, every message acknowledged.
#[tokio::test]
async fn under_a_file_size_limit_records_fit_their_segments() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let limit: u64 = 64 * 1024;
    let cfg = SpoolConfig {
        segment_size: limit,
        ..config(dir)
    };
    let (mut log, _) = open_log(&cfg).unwrap();
    log.shared
        .file_limit
        .store(limit, std::sync::atomic::Ordering::Relaxed);
    let first_seg = log.active.no;
    let mut waiting = Vec::new();
    let mut reqs = Vec::new();
    for i in 0..3u8 {
        let (id, r, rx) = msg_req(&log, Body::Mem(vec![b'a' + i; 25 * 1024]));
        waiting.push((id, rx));
        reqs.push(r);
    }
    let syncs = log.shared.syncs.load(std::sync::atomic::Ordering::Relaxed);
    assert!(!log.process(reqs));
    let mut ids = Vec::new();
    for (id, rx) in waiting {
        answer(rx).unwrap();
        ids.push(id);
    }
    assert!(
        log.shared.syncs.load(std::sync::atomic::Ordering::Relaxed) >= syncs + 2,
        "written in at least two parts"
    );
    assert!(log.active.no > first_seg, "rolled to fit the rest");
    for no in list_segments(dir).unwrap() {
        let len = std::fs::metadata(segment_path(dir, no)).unwrap().len();
        assert!(len <= limit, "segment {no} is {len} bytes");
    }
    drop(log);

    let (spool, rep) = Spool::open(cfg.clone()).unwrap();
    assert_eq!(rep.messages, 3);
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(
            spool.read_body(*id).await.unwrap(),
            vec![b'a' + i as u8; 25 * 1024]
        );
    }
    spool
        .inner_shared_for_tests()
        .file_limit
        .store(limit, std::sync::atomic::Ordering::Relaxed);
    let syncs = spool.sync_count();
    let e = commit_body(&spool, envelope(1), &vec![b'z'; 70 * 1024])
        .await
        .unwrap_err();
    assert!(
        matches!(&e, SpoolError::Io(io) if io.kind() == std::io::ErrorKind::FileTooLarge),
        "{e}"
    );
    assert_eq!(spool.sync_count(), syncs, "never reached the log");
    let small = commit_body(&spool, envelope(1), b"small").await.unwrap();
    assert_eq!(spool.read_body(small).await.unwrap(), b"small");
}
