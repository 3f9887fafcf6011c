//! Recovery: torn tails, corruption, write/sync failures.

use std::path::Path;

use super::recover::list_segments;
use super::tests::{commit_body, config, envelope, reopen};
use super::writer::segment_path;
use super::*;

fn only_segment(dir: &Path) -> std::path::PathBuf {
    let segs = list_segments(dir).unwrap();
    assert_eq!(segs.len(), 1, "{segs:?}");
    segment_path(dir, segs[0])
}

fn copy_dir_segments(from: &Path, to: &Path) {
    for no in list_segments(from).unwrap() {
        std::fs::copy(segment_path(from, no), segment_path(to, no)).unwrap();
    }
}

#[tokio::test]
async fn torn_tail_at_every_byte_of_the_last_record() {
    let src = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(config(src.path())).unwrap();
    let a = commit_body(&spool, envelope(1), b"first body\r\n")
        .await
        .unwrap();
    let b = commit_body(&spool, envelope(1), b"second body\r\n")
        .await
        .unwrap();
    spool
        .update(
            a,
            vec![(
                0,
                RcptStatus::Failed {
                    reply: "550".into(),
                    at: 1,
                },
            )],
        )
        .await
        .unwrap();
    let seg = only_segment(src.path());
    let before_last = std::fs::metadata(&seg).unwrap().len();
    let c = commit_body(&spool, envelope(2), b"third body\r\n")
        .await
        .unwrap();
    spool.close().await;
    let full = std::fs::read(&seg).unwrap();
    assert!(full.len() as u64 > before_last);
    let name = seg.file_name().unwrap().to_owned();
    for cut in before_last as usize..full.len() {
        for garbage in [false, true] {
            let dst = tempfile::tempdir().unwrap();
            let mut bytes = full[..cut].to_vec();
            if garbage {
                // A torn write can also leave zeros instead of a short file.
                bytes.resize(full.len(), 0);
            }
            std::fs::write(dst.path().join(&name), &bytes).unwrap();
            let (s, rep) = Spool::open(config(dst.path())).unwrap();
            // Zeros right after the last whole record are the clean end of
            // a preallocated segment; a partial record (it starts with the
            // non-zero magic) before them is a torn tail.
            let torn = usize::from(cut as u64 > before_last);
            assert_eq!(rep.torn_tails_cut, torn, "cut at {cut}");
            // Lost: the torn record's bytes up to its last non-zero one.
            let nonzero_end = bytes.iter().rposition(|&x| x != 0).map_or(0, |p| p + 1);
            let lost = (nonzero_end as u64).saturating_sub(before_last);
            assert_eq!(rep.bytes_lost, lost, "cut at {cut}");
            assert!(rep.corrupt_segments.is_empty(), "cut at {cut}");
            assert_eq!(rep.messages, 2, "cut at {cut}");
            assert!(s.get(c).is_none());
            assert!(s.get(a).unwrap().recipients[0].status.is_final());
            assert_eq!(s.read_body(b).await.unwrap(), b"second body\r\n");
            // A torn tail in a file shorter than a segment (not
            // preallocated) is truncated; a clean zero tail is left alone.
            let after = std::fs::read(dst.path().join(&name)).unwrap();
            let want_len = if torn == 1 {
                before_last as usize
            } else {
                bytes.len()
            };
            assert_eq!(after.len(), want_len, "cut at {cut}");
            assert_eq!(after[..before_last as usize], full[..before_last as usize]);
            assert!(after[before_last as usize..].iter().all(|&x| x == 0));
            // The log keeps working after the cut: the next record starts
            // where the torn one did.
            let d = commit_body(&s, envelope(1), b"again").await.unwrap();
            let seg_no = list_segments(dst.path()).unwrap()[0];
            assert_eq!(s.location(d), Some((seg_no, before_last)), "cut at {cut}");
            let (s, rep) = reopen(s, config(dst.path())).await;
            assert_eq!(rep.torn_tails_cut, 0);
            assert!(rep.corrupt_segments.is_empty());
            assert_eq!(s.read_body(d).await.unwrap(), b"again");
        }
    }
}

#[tokio::test]
async fn corrupted_byte_in_the_middle_quarantines_and_recovers_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(config(tmp.path())).unwrap();
    let mut ids = Vec::new();
    for i in 0..5u8 {
        let body = vec![b'a' + i; 300];
        ids.push(commit_body(&spool, envelope(1), &body).await.unwrap());
    }
    spool.finish(ids[0]).await.unwrap();
    let st = RcptStatus::Delivered {
        reply: "250".into(),
        at: 9,
    };
    spool.update(ids[4], vec![(0, st.clone())]).await.unwrap();
    spool.close().await;
    drop(spool);
    let seg = only_segment(tmp.path());
    let mut bytes = std::fs::read(&seg).unwrap();
    // Flip one byte inside the body of message 2 ("ccc...").
    let pos = bytes
        .windows(300)
        .position(|w| w.iter().all(|&b| b == b'c'))
        .unwrap();
    bytes[pos + 150] ^= 0x40;
    std::fs::write(&seg, &bytes).unwrap();

    let ro = scan_read_only(tmp.path()).unwrap();
    assert_eq!(ro.len(), 3, "read-only scan skips the damaged record");
    let (spool, rep) = Spool::open(config(tmp.path())).unwrap();
    assert_eq!(rep.corrupt_segments.len(), 1);
    assert!(rep.corrupt_segments[0].starts_with(tmp.path().join("corrupt")));
    assert!(rep.corrupt_segments[0].exists(), "kept, never deleted");
    assert!(!seg.exists());
    assert!(rep.bytes_lost > 300);
    assert_eq!(rep.messages, 3);
    assert!(spool.get(ids[0]).is_none(), "DONE survives the rewrite");
    assert!(spool.get(ids[2]).is_none(), "never a partial message");
    for i in [1usize, 3, 4] {
        assert_eq!(
            spool.read_body(ids[i]).await.unwrap(),
            vec![b'a' + i as u8; 300]
        );
    }
    assert_eq!(spool.get(ids[4]).unwrap().recipients[0].status, st);
    let (spool, rep) = reopen(spool, config(tmp.path())).await;
    assert!(rep.corrupt_segments.is_empty(), "stable after the repair");
    assert_eq!(rep.messages, 3);
    assert_eq!(spool.get(ids[4]).unwrap().recipients[0].status, st);
    assert_eq!(spool.read_body(ids[3]).await.unwrap(), vec![b'd'; 300]);
}

#[tokio::test]
async fn damage_everywhere_never_panics() {
    // Flip each byte of a small spool in turn (stride to keep it quick).
    let src = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(config(src.path())).unwrap();
    let a = commit_body(&spool, envelope(1), b"alpha").await.unwrap();
    let b = commit_body(&spool, envelope(1), b"bravo").await.unwrap();
    spool
        .update(a, vec![(0, RcptStatus::Pending)])
        .await
        .unwrap();
    spool.close().await;
    drop(spool);
    let seg = only_segment(src.path());
    let full = std::fs::read(&seg).unwrap();
    for pos in (0..full.len()).step_by(7) {
        let dst = tempfile::tempdir().unwrap();
        copy_dir_segments(src.path(), dst.path());
        let mut bytes = full.clone();
        bytes[pos] ^= 0xFF;
        std::fs::write(
            segment_path(dst.path(), list_segments(dst.path()).unwrap()[0]),
            &bytes,
        )
        .unwrap();
        let (s, rep) = Spool::open(config(dst.path())).unwrap();
        for (id, want) in [(a, &b"alpha"[..]), (b, &b"bravo"[..])] {
            if s.get(id).is_some() {
                assert_eq!(s.read_body(id).await.unwrap(), want, "flip at {pos}");
            }
        }
        assert!(rep.messages <= 2);
    }
}

#[tokio::test]
async fn write_and_sync_failures_fail_the_batch_and_the_spool_keeps_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(config(tmp.path())).unwrap();
    let ok1 = commit_body(&spool, envelope(1), b"one").await.unwrap();
    let size_ok = std::fs::metadata(only_segment(tmp.path())).unwrap().len();

    spool.faults().fail_writes(1);
    let e = commit_body(&spool, envelope(1), &vec![b'w'; 5000])
        .await
        .unwrap_err();
    assert!(
        matches!(&e, SpoolError::Io(io) if io.raw_os_error() == Some(libc::ENOSPC)),
        "{e}"
    );
    assert_eq!(
        std::fs::metadata(only_segment(tmp.path())).unwrap().len(),
        size_ok,
        "truncated back"
    );
    assert_eq!(spool.live().len(), 1);

    spool.faults().fail_syncs(1);
    assert!(commit_body(&spool, envelope(1), b"lost").await.is_err());
    spool.faults().fail_syncs(1);
    assert!(
        spool
            .update(
                ok1,
                vec![(
                    0,
                    RcptStatus::Failed {
                        reply: "5".into(),
                        at: 1
                    }
                )]
            )
            .await
            .is_err()
    );
    assert_eq!(
        spool.get(ok1).unwrap().recipients[0].status,
        RcptStatus::Pending
    );
    spool.faults().fail_writes(1);
    assert!(spool.finish(ok1).await.is_err());
    assert!(spool.get(ok1).is_some());

    let ok2 = commit_body(&spool, envelope(1), b"two").await.unwrap();
    let (spool, rep) = reopen(spool, config(tmp.path())).await;
    assert_eq!(rep.torn_tails_cut, 0);
    let ids: Vec<_> = spool.live().into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids, vec![ok1, ok2]);
    assert_eq!(
        spool.get(ok1).unwrap().recipients[0].status,
        RcptStatus::Pending
    );
    assert_eq!(spool.read_body(ok2).await.unwrap(), b"two");
}

#[tokio::test]
async fn garbage_files_and_headers() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(config(tmp.path())).unwrap();
    let a = commit_body(&spool, envelope(1), b"kept").await.unwrap();
    spool.close().await;
    drop(spool);
    let segs = list_segments(tmp.path()).unwrap();
    let last = *segs.last().unwrap();
    // A newer segment that crashed while being created (short header).
    std::fs::write(segment_path(tmp.path(), last + 1), b"TERN").unwrap();
    std::fs::write(tmp.path().join("notes.txt"), b"ignored").unwrap();
    let (spool, rep) = Spool::open(config(tmp.path())).unwrap();
    assert_eq!(rep.torn_tails_cut, 1);
    assert_eq!(spool.read_body(a).await.unwrap(), b"kept");
    spool.close().await;
    drop(spool);
    // An older segment that is not ours at all: quarantined, nothing lost.
    std::fs::write(segment_path(tmp.path(), 0), vec![0x55; 100]).unwrap();
    let (spool, rep) = Spool::open(config(tmp.path())).unwrap();
    assert_eq!(rep.corrupt_segments.len(), 1);
    assert_eq!(spool.read_body(a).await.unwrap(), b"kept");
}

#[tokio::test]
async fn a_damaged_segment_header_loses_no_intact_record() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(config(tmp.path())).unwrap();
    let mut ids = Vec::new();
    for i in 0..4u8 {
        ids.push(
            commit_body(&spool, envelope(1), &[b'k' + i; 200])
                .await
                .unwrap(),
        );
    }
    spool.close().await;
    drop(spool);
    let seg = only_segment(tmp.path());
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[0] ^= 0x20; // the magic: "tERNSPOL"
    std::fs::write(&seg, &bytes).unwrap();

    let (spool, rep) = Spool::open(config(tmp.path())).unwrap();
    assert_eq!(rep.corrupt_segments.len(), 1, "set aside as damaged");
    assert!(rep.corrupt_segments[0].exists(), "kept, never deleted");
    assert_eq!(rep.messages, 4, "every record behind the header recovered");
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(
            spool.read_body(*id).await.unwrap(),
            vec![b'k' + i as u8; 200]
        );
    }
    let (spool, rep) = reopen(spool, config(tmp.path())).await;
    assert!(rep.corrupt_segments.is_empty(), "stable after the repair");
    assert_eq!(rep.messages, 4);
    spool.close().await;
    drop(spool);

    // With its nonce bytes damaged too, nothing vouches for the records:
    // the segment is set aside whole (kept), and the spool still opens.
    let seg = list_segments(tmp.path()).unwrap();
    let seg = segment_path(tmp.path(), *seg.last().unwrap());
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[0] ^= 0x20;
    bytes[14] ^= 0x01;
    std::fs::write(&seg, &bytes).unwrap();
    let (_spool, rep) = Spool::open(config(tmp.path())).unwrap();
    assert_eq!(rep.corrupt_segments.len(), 1);
    assert_eq!(rep.messages, 0);
}
