//! Round trips, group commit, restart, reclaiming and compaction.

use std::path::Path;
use std::time::{Duration, Instant};

use super::recover::list_segments;
use super::*;

pub(crate) fn envelope(n: usize) -> Envelope {
    Envelope {
        sender: "alice@example.org".into(),
        recipients: (0..n)
            .map(|i| Recipient {
                address: format!("r{i}@example.net"),
                original: format!("R{i}@example.net"),
                orcpt: Some(format!("rfc822;r{i}@example.net")),
                notify: None,
                route: if i % 2 == 0 {
                    Route::Remote
                } else {
                    Route::Local {
                        mailbox: format!("u{i}"),
                    }
                },
                status: RcptStatus::Pending,
            })
            .collect(),
        received_at: 1_700_000_000,
        size: 0,
        smtputf8: false,
        body_type: Some("8BITMIME".into()),
        ret: None,
        envid: Some("env-1".into()),
        client_ip: "127.0.0.1".into(),
        helo: "client.example".into(),
        auth_user: None,
    }
}

/// A whole MSG record as it would sit in a segment whose nonce is `nonce`.
pub(crate) fn msg_record(id: u64, body: &[u8], nonce: u64) -> Vec<u8> {
    let mut env = envelope(1);
    env.size = body.len() as u64;
    let mut payload = record::msg_head(MsgId(id), &env).unwrap();
    payload.extend_from_slice(body);
    record::encode(record::Kind::Msg, &payload, nonce).unwrap()
}

pub(crate) fn config(dir: &Path) -> SpoolConfig {
    SpoolConfig {
        dir: dir.to_path_buf(),
        segment_size: 64 << 20,
        draft_memory_limit: 1024,
        compact_after: Duration::ZERO,
        commit_wait: Duration::ZERO,
    }
}

/// [`config`] with 4 KiB segments: a few 1000-byte messages each, so a
/// dozen messages roll through several segments.
fn small_segments(dir: &Path) -> SpoolConfig {
    SpoolConfig {
        segment_size: 4096,
        ..config(dir)
    }
}

pub(crate) async fn commit_body(
    spool: &Spool,
    env: Envelope,
    body: &[u8],
) -> Result<MsgId, SpoolError> {
    let mut d = spool.draft();
    // Several writes, as a session would do.
    for chunk in body.chunks(700) {
        d.write(chunk).await.unwrap();
    }
    spool.commit(env, d).await
}

pub(crate) async fn reopen(spool: Spool, cfg: SpoolConfig) -> (Spool, RecoveryReport) {
    spool.close().await;
    drop(spool);
    Spool::open(cfg).unwrap()
}

/// Commits `n` messages of 1,000 bytes (`body(i, 1000)`, `rcpts` recipients
/// each), in order; with small segments they span several.
async fn commit_many(spool: &Spool, n: u8, rcpts: usize) -> Vec<MsgId> {
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(
            commit_body(spool, envelope(rcpts), &body(i, 1000))
                .await
                .unwrap(),
        );
    }
    ids
}

fn body(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i % 251) as u8))
        .collect()
}

#[tokio::test]
async fn round_trip_and_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    let (spool, rep) = Spool::open(cfg.clone()).unwrap();
    assert_eq!(rep.messages, 0);
    let small = body(1, 100);
    let large = body(2, 300_000); // spills to a scratch file
    let a = commit_body(&spool, envelope(2), &small).await.unwrap();
    let b = commit_body(&spool, envelope(3), &large).await.unwrap();
    let c = commit_body(&spool, envelope(1), b"").await.unwrap();
    assert!(a < b && b < c, "ids are monotone");
    assert_eq!(spool.get(b).unwrap().size, large.len() as u64);
    assert_eq!(spool.read_body(a).await.unwrap(), small);
    assert_eq!(spool.read_body(b).await.unwrap(), large);
    assert!(spool.read_body(c).await.unwrap().is_empty());
    let ids: Vec<_> = spool.live().into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids, vec![a, b, c]);
    // No scratch file survives a commit.
    assert_eq!(
        std::fs::read_dir(tmp.path().join("scratch"))
            .unwrap()
            .count(),
        0
    );

    let done = RcptStatus::Delivered {
        reply: "250 ok".into(),
        at: 5,
    };
    let later = RcptStatus::Deferred {
        reply: "451 later".into(),
        attempts: 1,
        next_attempt: 99,
        delay_notified: false,
    };
    spool
        .update(b, vec![(0, done.clone()), (2, later.clone())])
        .await
        .unwrap();
    let eb = spool.get(b).unwrap();
    assert_eq!(eb.recipients[0].status, done);
    assert_eq!(eb.recipients[1].status, RcptStatus::Pending);
    assert_eq!(eb.recipients[2].status, later);
    assert!(matches!(
        spool.update(b, vec![(3, done.clone())]).await,
        Err(SpoolError::Io(_))
    ));
    spool.finish(a).await.unwrap();
    assert!(spool.get(a).is_none());
    assert!(matches!(spool.read_body(a).await, Err(SpoolError::NotFound(x)) if x == a));
    assert!(matches!(
        spool.finish(a).await,
        Err(SpoolError::NotFound(_))
    ));
    assert!(matches!(
        spool.update(a, vec![]).await,
        Err(SpoolError::NotFound(_))
    ));

    let before = spool.live();
    let (spool, rep) = reopen(spool, cfg.clone()).await;
    assert_eq!(rep.messages, 2);
    assert_eq!(rep.torn_tails_cut, 0);
    assert!(rep.corrupt_segments.is_empty());
    assert_eq!(spool.live(), before);
    assert_eq!(spool.read_body(b).await.unwrap(), large);
    // Ids stay unique across restarts.
    let d = commit_body(&spool, envelope(1), b"x").await.unwrap();
    assert!(d > c);
    // The read-only helpers see the same thing while the spool is open.
    let ro = scan_read_only(tmp.path()).unwrap();
    assert_eq!(ro, spool.live());
    assert_eq!(read_body_read_only(tmp.path(), b).unwrap(), large);
    assert!(spool.free_space().unwrap() > 0);
    spool.close().await;
    assert!(matches!(
        commit_body(&spool, envelope(1), b"y").await,
        Err(SpoolError::Closed)
    ));
    assert!(matches!(spool.finish(b).await, Err(SpoolError::Closed)));
}

#[tokio::test]
async fn dropped_draft_removes_scratch() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(config(tmp.path())).unwrap();
    let mut d = spool.draft();
    d.write(&body(3, 5000)).await.unwrap();
    assert_eq!(d.len(), 5000);
    assert_eq!(
        std::fs::read_dir(tmp.path().join("scratch"))
            .unwrap()
            .count(),
        1
    );
    drop(d);
    assert_eq!(
        std::fs::read_dir(tmp.path().join("scratch"))
            .unwrap()
            .count(),
        0
    );
    // A stale scratch file (crash) is removed at open.
    std::fs::write(tmp.path().join("scratch/stale.tmp"), b"junk").unwrap();
    let (_s2, _) = reopen(spool, config(tmp.path())).await;
    assert_eq!(
        std::fs::read_dir(tmp.path().join("scratch"))
            .unwrap()
            .count(),
        0
    );
}

#[test]
fn msgid_text_round_trip() {
    let id = MsgId(0x0123_4567_89AB_CDEF);
    assert_eq!(id.to_string(), "0123456789ABCDEF");
    assert_eq!("0123456789ABCDEF".parse::<MsgId>().unwrap(), id);
    assert_eq!("0123456789abcdef".parse::<MsgId>().unwrap(), id);
    assert!("".parse::<MsgId>().is_err());
    assert!("0123456789ABCDEF0".parse::<MsgId>().is_err());
    assert!("+1".parse::<MsgId>().is_err());
    let g = IdGen::new(u64::MAX - 5);
    let a = g.next();
    assert!(g.next() > a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_commits_are_group_committed() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    let (spool, _) = Spool::open(cfg.clone()).unwrap();
    let base = spool.sync_count();
    let n = 200;
    let mut tasks = Vec::new();
    for i in 0..n {
        let s = spool.clone();
        tasks.push(tokio::spawn(async move {
            let b = body(i as u8, 200 + i);
            let id = commit_body(&s, envelope(1), &b).await.unwrap();
            (id, b)
        }));
    }
    let mut committed = Vec::new();
    for t in tasks {
        committed.push(t.await.unwrap());
    }
    let syncs = spool.sync_count() - base;
    assert!(syncs >= 1);
    assert!(
        syncs * 4 <= n as u64,
        "{syncs} syncs for {n} commits: not group-committed"
    );
    let (spool, rep) = reopen(spool, cfg).await;
    assert_eq!(rep.messages, n);
    for (id, b) in committed {
        assert_eq!(spool.read_body(id).await.unwrap(), b);
    }
}

/// Prepended fields are stored in front of the content, last prepend first,
/// for a body in memory and for one spilled to a scratch file alike; the
/// content read back for checks is the client's alone.
#[tokio::test]
async fn prepended_fields_come_first_in_memory_and_spilled() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    let (spool, _) = Spool::open(cfg.clone()).unwrap();
    for size in [100, 5000] {
        let content = body(7, size);
        let mut d = spool.draft();
        for chunk in content.chunks(700) {
            d.write(chunk).await.unwrap();
        }
        d.prepend(b"Date: x\r\n");
        d.prepend(b"Received: y\r\n");
        assert_eq!(d.content().await.unwrap(), content, "{size}");
        assert_eq!(d.len(), (content.len() + 22) as u64);
        let id = spool.commit(envelope(1), d).await.unwrap();
        let mut want = b"Received: y\r\nDate: x\r\n".to_vec();
        want.extend_from_slice(&content);
        assert_eq!(spool.read_body(id).await.unwrap(), want, "{size}");
        assert_eq!(spool.get(id).unwrap().size, want.len() as u64);
    }
    let (spool, _) = reopen(spool, cfg).await;
    assert_eq!(spool.live().len(), 2);
}

/// A commit made while another session is still receiving a body waits for
/// it (`commit_wait`), and both share one sync; the wait ends as soon as that
/// body is committed, long before the (here huge) `commit_wait`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_waits_for_bodies_still_arriving() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = SpoolConfig {
        commit_wait: Duration::from_secs(20),
        ..config(tmp.path())
    };
    let (spool, _) = Spool::open(cfg).unwrap();
    let base = spool.sync_count();
    let mut still_arriving = spool.draft();
    still_arriving.write(b"second body\r\n").await.unwrap();
    let started = Instant::now();
    let first = {
        let s = spool.clone();
        tokio::spawn(async move { commit_body(&s, envelope(1), b"first body\r\n").await })
    };
    // The first commit is parked in the committer until the other body ends.
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!first.is_finished(), "the first commit did not wait");
    let second = spool.commit(envelope(1), still_arriving).await.unwrap();
    let first = first.await.unwrap().unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(spool.sync_count() - base, 1, "two commits, one sync");
    assert_eq!(spool.read_body(first).await.unwrap(), b"first body\r\n");
    assert_eq!(spool.read_body(second).await.unwrap(), b"second body\r\n");
}

/// A commit waits for nobody when no other body is arriving, and an abandoned
/// body (the client went away) ends the wait of those parked behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_wait_ends_when_nobody_else_is_receiving() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = SpoolConfig {
        commit_wait: Duration::from_secs(20),
        ..config(tmp.path())
    };
    let (spool, _) = Spool::open(cfg).unwrap();
    let started = Instant::now();
    commit_body(&spool, envelope(1), b"alone\r\n")
        .await
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));

    let abandoned = spool.draft();
    let parked = {
        let s = spool.clone();
        tokio::spawn(async move { commit_body(&s, envelope(1), b"parked\r\n").await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!parked.is_finished(), "the commit did not wait");
    drop(abandoned);
    let id = parked.await.unwrap().unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(spool.read_body(id).await.unwrap(), b"parked\r\n");
}

/// Poll with a deadline (reclaiming runs on the committer after a batch).
pub(crate) async fn wait_until(mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "condition not reached before the deadline"
        );
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test]
async fn segments_roll_get_deleted_and_compacted() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = small_segments(tmp.path());
    let (spool, _) = Spool::open(cfg.clone()).unwrap();
    let ids = commit_many(&spool, 12, 2).await;
    let segs = list_segments(tmp.path()).unwrap();
    assert!(segs.len() >= 4, "rolled into several segments: {segs:?}");
    let (k, first) = lone_survivor(&spool, &ids);
    let keep = ids[k];
    let st = RcptStatus::Failed {
        reply: "550 no".into(),
        at: 7,
    };
    spool.update(keep, vec![(1, st.clone())]).await.unwrap();
    for id in ids.iter().filter(|id| **id != keep) {
        spool.finish(*id).await.unwrap();
    }
    // Dead segments go, and `first` (one live message in ~4 KiB) is
    // compacted: its message is copied forward, then it is deleted.
    let dir = tmp.path().to_path_buf();
    wait_until(|| reclaimed(&spool, &dir) && !spool.segment_numbers().contains(&first)).await;
    assert!(!list_segments(&dir).unwrap().contains(&first));
    assert_eq!(spool.read_body(keep).await.unwrap(), body(k as u8, 1000));
    assert_eq!(spool.get(keep).unwrap().recipients[1].status, st);
    let (spool, rep) = reopen(spool, cfg).await;
    assert_eq!(rep.messages, 1);
    assert_eq!(spool.live().len(), 1);
    assert_eq!(spool.get(keep).unwrap().recipients[1].status, st);
    assert_eq!(spool.read_body(keep).await.unwrap(), body(k as u8, 1000));
    spool.finish(keep).await.unwrap();
    let (spool, rep) = reopen(spool, config(tmp.path())).await;
    assert_eq!(rep.messages, 0);
    assert!(spool.live().is_empty());
}

#[tokio::test]
async fn two_copies_newest_wins_and_done_anywhere_wins() {
    // Simulate a crash between a compaction copy and the old segment's
    // deletion: the same MSG id in two segments.
    let tmp = tempfile::tempdir().unwrap();
    let cfg = SpoolConfig {
        segment_size: 2048,
        ..config(tmp.path())
    };
    let (spool, _) = Spool::open(cfg.clone()).unwrap();
    let a = commit_body(&spool, envelope(1), &body(9, 1500))
        .await
        .unwrap();
    let filler = commit_body(&spool, envelope(1), &body(8, 1500))
        .await
        .unwrap();
    spool.close().await;
    drop(spool);
    let segs = list_segments(tmp.path()).unwrap();
    assert!(segs.len() >= 2);
    // Copy segment 1 (holding `a`) as a new, newer segment with a changed
    // status by writing a real MSG record through the encoder.
    let nonce = 77u64;
    let mut env = envelope(1);
    env.size = 1500;
    env.recipients[0].status = RcptStatus::Deferred {
        reply: "451".into(),
        attempts: 2,
        next_attempt: 3,
        delay_notified: true,
    };
    let mut payload = record::msg_head(a, &env).unwrap();
    payload.extend_from_slice(&body(9, 1500));
    let mut seg = record::segment_header(nonce).to_vec();
    seg.extend(record::encode(record::Kind::Msg, &payload, nonce).unwrap());
    let newest = segs.last().unwrap() + 1;
    std::fs::write(writer::segment_path(tmp.path(), newest), &seg).unwrap();
    let (spool, rep) = Spool::open(cfg.clone()).unwrap();
    assert_eq!(rep.messages, 2);
    assert_eq!(
        spool.get(a).unwrap().recipients[0].status,
        env.recipients[0].status
    );
    assert_eq!(spool.read_body(a).await.unwrap(), body(9, 1500));
    spool.finish(a).await.unwrap();
    spool.finish(filler).await.unwrap();
    let (spool, rep) = reopen(spool, cfg).await;
    assert_eq!(rep.messages, 0, "DONE wins over every copy");
    assert!(spool.live().is_empty());
}

#[tokio::test]
async fn batched_body_reads_span_segments_in_request_order() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = small_segments(tmp.path());
    let (spool, _) = Spool::open(cfg).unwrap();
    let ids = commit_many(&spool, 8, 1).await;
    assert!(list_segments(tmp.path()).unwrap().len() >= 2);
    spool.finish(ids[3]).await.unwrap();
    // Out of log order, with a repeat, a finished and an unknown message.
    let ask = vec![ids[7], ids[0], ids[3], ids[0], MsgId(9_999_999), ids[5]];
    let spool2 = spool.clone();
    let got = tokio::task::spawn_blocking(move || spool2.read_bodies_blocking(&ask))
        .await
        .unwrap();
    assert_eq!(got.len(), 6);
    assert_eq!(got[0].as_ref().unwrap(), &body(7, 1000));
    assert_eq!(got[1].as_ref().unwrap(), &body(0, 1000));
    assert!(matches!(got[2], Err(SpoolError::NotFound(x)) if x == ids[3]));
    assert_eq!(got[3].as_ref().unwrap(), &body(0, 1000));
    assert!(matches!(got[4], Err(SpoolError::NotFound(_))));
    assert_eq!(got[5].as_ref().unwrap(), &body(5, 1000));
}

#[tokio::test]
async fn record_many_answers_each_outcome_in_order_and_survives_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    let (spool, _) = Spool::open(cfg.clone()).unwrap();
    let a = commit_body(&spool, envelope(2), b"a").await.unwrap();
    let b = commit_body(&spool, envelope(2), b"b").await.unwrap();
    let st = RcptStatus::Delivered {
        reply: "250 ok".into(),
        at: 5,
    };
    let syncs = spool.sync_count();
    let results = spool
        .record_many(vec![
            Outcome::Done(a),
            Outcome::State(b, vec![(0, st.clone())]),
            Outcome::Done(MsgId(9_999_999)),
            Outcome::State(b, vec![(7, st.clone())]),
        ])
        .await;
    assert!(results[0].is_ok() && results[1].is_ok(), "{results:?}");
    assert!(matches!(results[2], Err(SpoolError::NotFound(_))));
    assert!(results[3].is_err(), "recipient index out of range");
    assert!(spool.sync_count() - syncs <= 2, "one group commit (or two)");
    assert!(spool.get(a).is_none());
    assert_eq!(spool.get(b).unwrap().recipients[0].status, st);
    let (spool, rep) = reopen(spool, cfg).await;
    assert_eq!(rep.messages, 1);
    assert_eq!(spool.get(b).unwrap().recipients[0].status, st);
}

/// Which of `ids` to keep so that, once all others are finished, it is alone
/// in a closed segment it fills less than half of: the first message of the
/// oldest closed segment holding two or more. Returns its index in `ids` and
/// that segment. Looked up, not assumed: a growing segment ends early when
/// the preallocated spare becomes ready, so where segments end depends on
/// timing.
fn lone_survivor(spool: &Spool, ids: &[MsgId]) -> (usize, u32) {
    let active = *spool.segment_numbers().last().unwrap();
    let mut by_segment: std::collections::BTreeMap<u32, Vec<usize>> = Default::default();
    for (i, id) in ids.iter().enumerate() {
        let (seg, _) = spool.location(*id).unwrap();
        by_segment.entry(seg).or_default().push(i);
    }
    by_segment
        .into_iter()
        .find(|(seg, held)| *seg != active && held.len() >= 2)
        .map(|(seg, held)| (held[0], seg))
        .expect("a closed segment of two messages or more")
}

/// Small segments, 12 messages, all finished but one, alone in a closed
/// segment that is otherwise dead; the other segments are entirely dead.
/// Returns the ids, the index of the one kept, and its segment.
async fn one_live_in_first_segment(
    dir: &Path,
    compact_after: Duration,
) -> (Spool, Vec<MsgId>, usize, u32) {
    let cfg = SpoolConfig {
        compact_after,
        ..small_segments(dir)
    };
    let (spool, _) = Spool::open(cfg).unwrap();
    let ids = commit_many(&spool, 12, 1).await;
    let (k, first) = lone_survivor(&spool, &ids);
    for (i, id) in ids.iter().enumerate() {
        if i != k {
            spool.finish(*id).await.unwrap();
        }
    }
    (spool, ids, k, first)
}

/// The spool has reclaimed all it can for now: nothing deletable is left in
/// the index, and the files on disk are the index's segments.
fn reclaimed(spool: &Spool, dir: &Path) -> bool {
    spool.dead_segments().is_empty() && list_segments(dir).unwrap() == spool.segment_numbers()
}

#[tokio::test]
async fn a_recently_closed_segment_is_not_compacted_but_dead_ones_go() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, ids, k, first) =
        one_live_in_first_segment(tmp.path(), Duration::from_secs(3600)).await;
    let dir = tmp.path().to_path_buf();
    wait_until(|| reclaimed(&spool, &dir)).await;
    // A request after that reclaim returns only once a later reclaim is over.
    let probe = commit_body(&spool, envelope(1), b"p").await.unwrap();
    spool.finish(probe).await.unwrap();
    // The first segment, still holding a message in flight, is left whole
    // for it to finish rather than copied forward...
    let kept = spool.segment_numbers();
    assert!(kept.contains(&first), "{kept:?}");
    assert!(list_segments(&dir).unwrap().contains(&first));
    assert_eq!(spool.read_body(ids[k]).await.unwrap(), body(k as u8, 1000));
    // ...and every other closed segment is gone, except those holding the
    // DONE records of its finished messages, which must outlive it (when
    // the spare segment is ready decides where those records land).
    let active = *kept.last().unwrap();
    let outliving = spool.segments_outliving(first);
    for no in &kept {
        assert!(
            *no == first || *no == active || outliving.contains(no),
            "segment {no} kept for no reason: {kept:?}, outliving {outliving:?}"
        );
    }
    spool.finish(ids[k]).await.unwrap();
    // The next batch's reclaim deletes it, then those that outlived it.
    commit_body(&spool, envelope(1), b"x").await.unwrap();
    wait_until(|| reclaimed(&spool, &dir)).await;
    let left = spool.segment_numbers();
    assert!(!left.contains(&first), "{left:?}");
    assert!(left.iter().all(|no| !outliving.contains(no)), "{left:?}");
}

#[tokio::test]
async fn a_settled_segment_is_compacted_while_no_mail_flows() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, ids, k, first) =
        one_live_in_first_segment(tmp.path(), Duration::from_secs(1)).await;
    // No request follows: only the reclaim ticker can compact the first
    // segment once it has been closed for a second.
    let dir = tmp.path().to_path_buf();
    wait_until(|| !list_segments(&dir).unwrap().contains(&first)).await;
    assert_eq!(spool.read_body(ids[k]).await.unwrap(), body(k as u8, 1000));
}

#[tokio::test]
async fn reserved_ids_commit_in_any_order_and_stay_unique_after_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    let (spool, _) = Spool::open(cfg.clone()).unwrap();
    let first = spool.reserve_id();
    let second = spool.reserve_id();
    let unused = spool.reserve_id();
    assert!(first < second && second < unused);
    let mut d = spool.draft();
    d.write(b"two").await.unwrap();
    assert_eq!(
        spool.commit_as(second, envelope(1), d).await.unwrap(),
        second
    );
    let mut d = spool.draft();
    d.write(b"one").await.unwrap();
    assert_eq!(spool.commit_as(first, envelope(1), d).await.unwrap(), first);
    assert_eq!(spool.read_body(first).await.unwrap(), b"one");
    assert_eq!(spool.read_body(second).await.unwrap(), b"two");
    let ids: Vec<_> = spool.live().into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids, vec![first, second]);
    let (spool, _) = reopen(spool, cfg).await;
    assert!(spool.reserve_id() > second);
}

/// A message kept live, and the body it must always read back as.
type KeptBody = (MsgId, Vec<u8>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_reads_racing_compaction_always_return_the_whole_body() {
    let tmp = tempfile::tempdir().unwrap();
    // Small segments, compaction at once. Each round commits a small kept
    // message together with large fillers that finish at once, so the
    // segments it lands in are soon mostly dead and compacted: the kept
    // messages are copied forward and their old segments deleted while a
    // reader keeps reading them.
    let cfg = small_segments(tmp.path());
    let (spool, _) = Spool::open(cfg).unwrap();
    let kept: std::sync::Arc<std::sync::Mutex<Vec<KeptBody>>> = Default::default();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (spool, stop, kept) = (spool.clone(), stop.clone(), kept.clone());
        std::thread::spawn(move || {
            let mut reads = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let now = kept.lock().unwrap().clone();
                for (id, want) in now {
                    assert_eq!(spool.read_body_blocking(id).unwrap(), want, "{id}");
                    reads += 1;
                }
            }
            reads
        })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last_seen: std::collections::HashMap<MsgId, Option<(u32, u64)>> = Default::default();
    let mut moves = 0;
    let mut seed = 0u8;
    while moves < 20 {
        assert!(Instant::now() < deadline, "moved only {moves} times");
        let (small, large) = (body(seed, 200), body(seed, 1000));
        let (k, f1, f2, f3) = tokio::join!(
            commit_body(&spool, envelope(1), &small),
            commit_body(&spool, envelope(1), &large),
            commit_body(&spool, envelope(1), &large),
            commit_body(&spool, envelope(1), &large),
        );
        for f in [f1, f2, f3] {
            spool.finish(f.unwrap()).await.unwrap();
        }
        let k = k.unwrap();
        kept.lock().unwrap().push((k, small));
        last_seen.insert(k, spool.location(k));
        seed = seed.wrapping_add(1);
        for (id, at) in last_seen.iter_mut() {
            let now = spool.location(*id);
            if now != *at {
                moves += 1;
                *at = now;
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let reads = reader.join().expect("every read returned the whole body");
    assert!(reads > 0);
    let all = kept.lock().unwrap().clone();
    for (id, want) in all {
        assert_eq!(spool.read_body(id).await.unwrap(), want);
    }
}

/// Records written before envelopes carried the submitting user still read
/// (no user), and mail without one is written as before.
#[test]
fn envelope_auth_user_is_optional_in_records() {
    let old = envelope(1);
    let mut json: serde_json::Value = serde_json::to_value(&old).unwrap();
    assert!(json.get("auth_user").is_none(), "{json}");
    json.as_object_mut().unwrap().remove("auth_user");
    let read: Envelope = serde_json::from_value(json).unwrap();
    assert_eq!(read.auth_user, None);
    let with_user = Envelope {
        auth_user: Some("alice".into()),
        ..old
    };
    let text = serde_json::to_string(&with_user).unwrap();
    let back: Envelope = serde_json::from_str(&text).unwrap();
    assert_eq!(back.auth_user.as_deref(), Some("alice"));
}
