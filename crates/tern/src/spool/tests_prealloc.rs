//! Preallocated segments: zero tails are a clean end, torn records before
//! zeros are cut in place, crashes while preparing a spare are harmless, and
//! a spool under load rolls into prepared segments.

use std::path::Path;
use std::time::{Duration, Instant};

use super::record::{self, SEG_HDR_LEN};
use super::recover::list_segments;
use super::spare::SPARE_NAME;
use super::tests::{commit_body, config, envelope, msg_record, reopen};
use super::writer::segment_path;
use super::*;

const NONCE: u64 = 0x5EED_F00D;

/// A segment file as the spool preallocates it: header, `records`, zeros up
/// to `size`. Returns the logical end.
fn write_prealloc(path: &Path, records: &[Vec<u8>], size: usize) -> u64 {
    let mut buf = record::segment_header(NONCE).to_vec();
    for r in records {
        buf.extend_from_slice(r);
    }
    let end = buf.len() as u64;
    assert!(buf.len() <= size);
    buf.resize(size, 0);
    std::fs::write(path, &buf).unwrap();
    end
}

fn cfg_sized(dir: &Path, segment_size: u64) -> SpoolConfig {
    SpoolConfig {
        segment_size,
        ..config(dir)
    }
}

#[tokio::test]
async fn reopen_preallocated_segment_is_clean_and_appends_at_logical_end() {
    let tmp = tempfile::tempdir().unwrap();
    let size = 256 * 1024;
    // An older, rolled preallocated segment and the active one.
    let old_end = write_prealloc(
        &segment_path(tmp.path(), 1),
        &[msg_record(10, b"old one", NONCE)],
        size,
    );
    let end = write_prealloc(
        &segment_path(tmp.path(), 2),
        &[
            msg_record(11, b"alpha", NONCE),
            msg_record(12, b"bravo", NONCE),
        ],
        size,
    );
    let cfg = cfg_sized(tmp.path(), size as u64);
    let ro = scan_read_only(tmp.path()).unwrap();
    assert_eq!(
        ro.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        [MsgId(10), MsgId(11), MsgId(12)]
    );
    assert_eq!(
        read_body_read_only(tmp.path(), MsgId(12)).unwrap(),
        b"bravo"
    );

    let (spool, rep) = Spool::open(cfg.clone()).unwrap();
    assert_eq!(rep.torn_tails_cut, 0);
    assert!(rep.corrupt_segments.is_empty());
    assert_eq!(rep.bytes_lost, 0);
    assert_eq!(rep.messages, 3);
    // Space accounting sees the logical ends, not 256 KiB files.
    assert_eq!(spool.segment_sizes(), vec![(1, old_end), (2, end)]);
    let d = commit_body(&spool, envelope(1), b"charlie").await.unwrap();
    assert_eq!(
        spool.location(d),
        Some((2, end)),
        "appended at the logical end"
    );
    let seg2 = segment_path(tmp.path(), 2);
    assert_eq!(std::fs::metadata(&seg2).unwrap().len(), size as u64);
    assert_eq!(spool.read_body(MsgId(10)).await.unwrap(), b"old one");

    let (spool, rep) = reopen(spool, cfg).await;
    assert_eq!((rep.torn_tails_cut, rep.bytes_lost), (0, 0));
    assert!(rep.corrupt_segments.is_empty());
    assert_eq!(rep.messages, 4);
    assert_eq!(spool.read_body(d).await.unwrap(), b"charlie");
    assert_eq!(std::fs::metadata(&seg2).unwrap().len(), size as u64);
    assert_eq!(scan_read_only(tmp.path()).unwrap(), spool.live());
    assert_eq!(read_body_read_only(tmp.path(), d).unwrap(), b"charlie");
}

#[tokio::test]
async fn torn_record_before_zeros_is_cut_in_place_and_overwritten() {
    let tmp = tempfile::tempdir().unwrap();
    let size = 256 * 1024;
    let seg = segment_path(tmp.path(), 1);
    let third = msg_record(13, &[b'z'; 900], NONCE);
    // Every cut of the third record (header only, half, all but the CRC).
    for keep in [1, 12, third.len() / 2, third.len() - 1] {
        let partial = third[..keep].to_vec();
        let end = write_prealloc(
            &seg,
            &[
                msg_record(11, b"alpha", NONCE),
                msg_record(12, b"bravo", NONCE),
            ],
            size,
        );
        // Put the partial record at the logical end, zeros after it.
        let mut bytes = std::fs::read(&seg).unwrap();
        bytes[end as usize..end as usize + keep].copy_from_slice(&partial);
        std::fs::write(&seg, &bytes).unwrap();
        let ro = scan_read_only(tmp.path()).unwrap();
        assert_eq!(ro.len(), 2, "keep {keep}");

        let cfg = cfg_sized(tmp.path(), size as u64);
        let (spool, rep) = Spool::open(cfg.clone()).unwrap();
        assert_eq!(rep.torn_tails_cut, 1, "keep {keep}");
        assert!(rep.corrupt_segments.is_empty());
        let nonzero = partial.iter().rposition(|&b| b != 0).unwrap() + 1;
        assert_eq!(rep.bytes_lost, nonzero as u64, "keep {keep}");
        assert_eq!(rep.messages, 2);
        assert!(spool.get(MsgId(13)).is_none(), "never a partial message");
        // Cut in place: size kept, the torn bytes are zeros now.
        let after = std::fs::read(&seg).unwrap();
        assert_eq!(after.len(), size);
        assert_eq!(after[..end as usize], bytes[..end as usize]);
        assert!(after[end as usize..].iter().all(|&b| b == 0), "keep {keep}");
        // The torn bytes were kept for forensics.
        let tail = tmp.path().join(format!("corrupt/00000001.tail-{end}"));
        assert_eq!(std::fs::read(&tail).unwrap(), partial[..nonzero]);

        // A shorter record overwrites the torn one and survives a reopen.
        let d = commit_body(&spool, envelope(1), b"d").await.unwrap();
        assert_eq!(spool.location(d), Some((1, end)));
        assert_eq!(std::fs::metadata(&seg).unwrap().len(), size as u64);
        let (spool, rep) = reopen(spool, cfg).await;
        assert_eq!((rep.torn_tails_cut, rep.bytes_lost), (0, 0), "keep {keep}");
        assert!(rep.corrupt_segments.is_empty());
        assert_eq!(spool.read_body(d).await.unwrap(), b"d");
        assert_eq!(spool.read_body(MsgId(12)).await.unwrap(), b"bravo");
        spool.close().await;
        drop(spool);
        std::fs::remove_dir_all(tmp.path()).unwrap();
        std::fs::create_dir(tmp.path()).unwrap();
    }
}

#[tokio::test]
async fn garbage_between_records_and_zeros_in_older_segment_is_corruption() {
    // The zero rule is no loophole: a non-zero byte anywhere before the
    // zeros of a segment that is not the last is still damage.
    let tmp = tempfile::tempdir().unwrap();
    let size = 64 * 1024;
    let end = write_prealloc(
        &segment_path(tmp.path(), 1),
        &[msg_record(11, b"alpha", NONCE)],
        size,
    );
    let mut bytes = std::fs::read(segment_path(tmp.path(), 1)).unwrap();
    bytes[end as usize + 100] = 0x42;
    std::fs::write(segment_path(tmp.path(), 1), &bytes).unwrap();
    write_prealloc(
        &segment_path(tmp.path(), 2),
        &[msg_record(12, b"bravo", NONCE)],
        size,
    );
    let (spool, rep) = Spool::open(cfg_sized(tmp.path(), size as u64)).unwrap();
    assert_eq!(rep.corrupt_segments.len(), 1);
    assert_eq!(rep.bytes_lost, 101);
    assert_eq!(spool.read_body(MsgId(11)).await.unwrap(), b"alpha");
    assert_eq!(spool.read_body(MsgId(12)).await.unwrap(), b"bravo");
}

#[tokio::test]
async fn crash_while_preparing_a_spare_is_recovered_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    let (spool, _) = Spool::open(cfg.clone()).unwrap();
    let a = commit_body(&spool, envelope(1), b"kept").await.unwrap();
    spool.close().await;
    drop(spool);
    let last = *list_segments(tmp.path()).unwrap().last().unwrap();
    // Half-written spare: header and some zeros, never synced or renamed.
    let mut half = record::segment_header(NONCE).to_vec();
    half.resize(10_000, 0);
    std::fs::write(tmp.path().join(SPARE_NAME), &half).unwrap();
    // A spare renamed into place just before the crash: header + zeros.
    let renamed = segment_path(tmp.path(), last + 1);
    write_prealloc(&renamed, &[], 128 * 1024);
    let (spool, rep) = Spool::open(cfg.clone()).unwrap();
    assert_eq!((rep.torn_tails_cut, rep.bytes_lost), (0, 0));
    assert!(rep.corrupt_segments.is_empty());
    assert_eq!(rep.messages, 1);
    assert!(!tmp.path().join(SPARE_NAME).exists(), "stale spare removed");
    assert_eq!(spool.read_body(a).await.unwrap(), b"kept");
    // The renamed, empty spare is simply the active segment now.
    let b = commit_body(&spool, envelope(1), b"next").await.unwrap();
    assert_eq!(spool.location(b), Some((last + 1, SEG_HDR_LEN)));
    let (spool, rep) = reopen(spool, cfg).await;
    assert_eq!((rep.torn_tails_cut, rep.messages), (0, 2));
    assert!(rep.corrupt_segments.is_empty());
    assert_eq!(spool.read_body(b).await.unwrap(), b"next");
}

#[tokio::test]
async fn spool_under_load_rolls_into_prepared_segments() {
    let tmp = tempfile::tempdir().unwrap();
    let size: u64 = 64 * 1024;
    let cfg = cfg_sized(tmp.path(), size);
    let (spool, _) = Spool::open(cfg.clone()).unwrap();
    let is_full_size =
        |no: u32| std::fs::metadata(segment_path(tmp.path(), no)).is_ok_and(|m| m.len() == size);
    // Commit until two segments are preallocated (spares are prepared in
    // the background, so poll with a deadline rather than count on timing).
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut ids = Vec::new();
    loop {
        let body = vec![b'a' + (ids.len() % 26) as u8; 3000];
        ids.push((commit_body(&spool, envelope(1), &body).await.unwrap(), body));
        let segs = list_segments(tmp.path()).unwrap();
        if segs.iter().filter(|n| is_full_size(**n)).count() >= 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never rolled into a spare: {segs:?}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // Logical sizes stay within a segment even though files are full size.
    for (no, logical) in spool.segment_sizes() {
        assert!(logical <= size, "segment {no}: {logical}");
    }
    let (spool, rep) = reopen(spool, cfg).await;
    assert_eq!((rep.torn_tails_cut, rep.bytes_lost), (0, 0));
    assert!(rep.corrupt_segments.is_empty());
    assert_eq!(rep.messages, ids.len());
    assert!(
        !tmp.path().join(SPARE_NAME).exists(),
        "spare removed at close"
    );
    for (id, body) in &ids {
        assert_eq!(&spool.read_body(*id).await.unwrap(), body);
    }
    assert_eq!(scan_read_only(tmp.path()).unwrap(), spool.live());
    // Group commit is unchanged: one sync per sequential commit, plus at
    // most one per prepared spare (counted, off the hot path).
    let base = spool.sync_count();
    for _ in 0..5 {
        commit_body(&spool, envelope(1), b"x").await.unwrap();
    }
    let syncs = spool.sync_count() - base;
    assert!((5..=7).contains(&syncs), "{syncs} syncs for 5 commits");
}
