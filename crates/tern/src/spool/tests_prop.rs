//! Property test: random commit/update/finish/failed-commit/reopen sequences
//! keep the index (and the bodies) equal to a simple model. Small segments
//! make rolls, deletions and compactions happen along the way.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::tests::{commit_body, envelope, reopen};
use super::*;

#[derive(Debug, Clone)]
enum Step {
    Commit { len: usize, rcpts: usize },
    Update { pick: usize, rcpt: usize, kind: u8 },
    Finish { pick: usize },
    FailedCommit,
    Reopen,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0usize..3000, 1usize..4).prop_map(|(len, rcpts)| Step::Commit { len, rcpts }),
        3 => (any::<usize>(), any::<usize>(), 0u8..4)
            .prop_map(|(pick, rcpt, kind)| Step::Update { pick, rcpt, kind }),
        2 => any::<usize>().prop_map(|pick| Step::Finish { pick }),
        1 => Just(Step::FailedCommit),
        1 => Just(Step::Reopen),
    ]
}

fn status(kind: u8, n: usize) -> RcptStatus {
    let n = n as i64;
    match kind {
        0 => RcptStatus::Pending,
        1 => RcptStatus::Delivered {
            reply: format!("250 ok {n}"),
            at: n,
        },
        2 => RcptStatus::Deferred {
            reply: "451 later".into(),
            attempts: n as u32,
            next_attempt: n,
            delay_notified: n % 2 == 0,
        },
        _ => RcptStatus::Failed {
            reply: "550 no".into(),
            at: n,
        },
    }
}

type Model = BTreeMap<MsgId, (Envelope, Vec<u8>)>;

fn pick(model: &Model, p: usize) -> Option<MsgId> {
    (!model.is_empty()).then(|| *model.keys().nth(p % model.len()).unwrap_or(&MsgId(0)))
}

async fn apply(spool: &mut Spool, cfg: &SpoolConfig, model: &mut Model, n: usize, s: Step) {
    match s {
        Step::Commit { len, rcpts } => {
            let body: Vec<u8> = (0..len).map(|i| (i * 31 + n) as u8).collect();
            let mut env = envelope(rcpts);
            let id = commit_body(spool, env.clone(), &body).await.unwrap();
            env.size = len as u64;
            model.insert(id, (env, body));
        }
        Step::Update {
            pick: p,
            rcpt,
            kind,
        } => {
            let Some(id) = pick(model, p) else { return };
            let Some((env, _)) = model.get_mut(&id) else {
                return;
            };
            let i = rcpt % env.recipients.len();
            let st = status(kind, n);
            spool.update(id, vec![(i, st.clone())]).await.unwrap();
            env.recipients[i].status = st;
        }
        Step::Finish { pick: p } => {
            let Some(id) = pick(model, p) else { return };
            spool.finish(id).await.unwrap();
            model.remove(&id);
        }
        Step::FailedCommit => {
            spool.faults().fail_writes(1);
            assert!(commit_body(spool, envelope(1), &[7u8; 2000]).await.is_err());
        }
        Step::Reopen => {
            let (s, rep) = reopen(spool.clone(), cfg.clone()).await;
            *spool = s;
            assert_eq!(rep.messages, model.len());
            assert_eq!(rep.torn_tails_cut, 0);
            assert!(rep.corrupt_segments.is_empty());
        }
    }
}

async fn run(steps: Vec<Step>) {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = SpoolConfig {
        dir: tmp.path().to_path_buf(),
        segment_size: 4096,
        draft_memory_limit: 1024,
        compact_after: std::time::Duration::ZERO,
        commit_wait: SpoolConfig::COMMIT_WAIT,
    };
    let (mut spool, _) = Spool::open(cfg.clone()).unwrap();
    let mut model = Model::new();
    for (n, s) in steps.into_iter().enumerate() {
        apply(&mut spool, &cfg, &mut model, n, s).await;
        let want: Vec<_> = model.iter().map(|(k, (e, _))| (*k, e.clone())).collect();
        assert_eq!(spool.live(), want, "after step {n}");
    }
    for (id, (_, body)) in &model {
        assert_eq!(&spool.read_body(*id).await.unwrap(), body);
    }
    let (spool, _) = reopen(spool, cfg.clone()).await;
    let want: Vec<_> = model.iter().map(|(k, (e, _))| (*k, e.clone())).collect();
    assert_eq!(spool.live(), want);
    assert_eq!(scan_read_only(tmp.path()).unwrap(), want);
    for (id, (_, body)) in &model {
        assert_eq!(&spool.read_body(*id).await.unwrap(), body);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn index_matches_model(steps in proptest::collection::vec(step(), 1..40)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(run(steps));
    }
}
