//! The queue manager ("qmgr"): takes committed messages from the spool,
//! delivers their local recipients in batches, records each outcome in the
//! spool, retries deferrals on a backoff schedule and finishes messages whose
//! recipients are all final.
//!
//! Batching is the point: while one batch is being delivered, newly committed
//! messages gather, so under load one batch carries many messages whose
//! Maildir fsyncs run in parallel, whose `new/` directories are synced once,
//! and whose `STATE`/`DONE` records share the spool's group commit. Under
//! load, a short linger after each batch lets the next one fill up; no timer
//! adds latency at low load.
//!
//! Invariants: a recipient's state changes only after its delivery result is
//! known; a message is finished (`DONE`) only once every recipient is final.
//! Remote recipients stay pending: outbound delivery comes with its own issue.
//! A local copy is delivered exactly once, across crashes too: an attempt
//! that may follow an earlier one (a message recovered at start-up, a
//! retry, an outcome the spool could not record) is marked a redelivery, so
//! the Maildir side finds a copy an earlier attempt wrote before its outcome
//! was recorded (see `deliver::maildir`); only a message's first attempt
//! after its 250 is not.
//!
//! Errors: a Maildir error defers that recipient (never bounces, never loses);
//! a spool error while recording leaves the recipient pending, so it is
//! attempted again later, as a redelivery.

use crate::config::LiveRuntime;
use crate::deliver::maildir::{CopyKey, Delivered, LocalCopy, MaildirNamer, deliver_batch};
use crate::deliver::worker::DeliveryThread;
use crate::metrics::{self, DeliveryClass, DeliveryOutcome};
use crate::outbound::OutboundHandle;
use crate::scheduler::backoff;
use crate::spool::{Envelope, MsgId, Outcome, RcptStatus, Route, Spool, SpoolError};
use rand::Rng;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Cheap handle to announce a committed message to whichever of local
/// delivery and the outbound manager has work in it.
#[derive(Clone)]
pub struct QueueHandle {
    tx: mpsc::UnboundedSender<MsgId>,
    outbound: OutboundHandle,
}

/// Who has work in a message: local delivery, the outbound manager, or both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Work {
    pub local: bool,
    pub remote: bool,
}

impl Work {
    pub fn of(envelope: &Envelope) -> Work {
        let has = |remote: bool| {
            envelope
                .recipients
                .iter()
                .any(|r| (r.route == Route::Remote) == remote && !r.status.is_final())
        };
        Work {
            local: has(false),
            remote: has(true),
        }
    }
}

impl QueueHandle {
    pub fn notify(&self, id: MsgId, work: Work) {
        // A closed channel means shutdown: the message is safe in the spool
        // and the next start delivers it.
        if work.local {
            let _ = self.tx.send(id);
        }
        if work.remote {
            self.outbound.notify(id);
        }
    }
}

/// The retry schedule: pure, so it is tested without a clock.
#[derive(Default)]
pub struct Schedule {
    due: BinaryHeap<Reverse<(i64, u64)>>,
}

impl Schedule {
    pub fn insert(&mut self, at: i64, id: MsgId) {
        self.due.push(Reverse((at, id.0)));
    }

    /// Removes and returns the ids due at `now`, at most `max`.
    pub fn take_due(&mut self, now: i64, max: usize, out: &mut VecDeque<MsgId>) {
        while out.len() < max {
            match self.due.peek() {
                Some(Reverse((at, _))) if *at <= now => {}
                _ => break,
            }
            if let Some(Reverse((_, id))) = self.due.pop() {
                out.push_back(MsgId(id));
            }
        }
    }

    pub fn next_due(&self) -> Option<i64> {
        self.due.peek().map(|Reverse((at, _))| *at)
    }
}

/// Longest wait for a fuller batch while mail keeps arriving (see
/// `Queue::linger`). A batch's two syncs are cache flushes, and on a disk
/// that flushes one at a time (this machine's) they delay the spool's
/// commits: at 4 KiB under load, 40 ms instead of 10 cut delivery's flushes
/// from 61 to 19 per second, the commit fdatasync's p50 from 607 to 483 µs,
/// and raised the accepted rate by about 10%.
const LINGER: Duration = Duration::from_millis(40);

/// Most message bytes one delivery batch holds in memory (a single larger
/// message still goes alone).
const BATCH_BYTES: u64 = 64 * 1024 * 1024;

/// Where one copy goes: the mailbox, its `Return-Path:`/`Delivered-To:`
/// lines and the mailbox's ownership, or why it cannot be delivered now.
type CopyTarget = Result<(PathBuf, Vec<u8>, crate::config::MailboxAccess), String>;

/// The local recipients of one message due in this attempt.
struct LocalJob {
    id: MsgId,
    envelope: Envelope,
    /// Indexes into `envelope.recipients`.
    due: Vec<usize>,
    /// An earlier attempt may have delivered copies the spool does not
    /// record (see `Queue::unrecorded`).
    redelivery: bool,
}

pub struct Queue {
    /// Read afresh for each batch: a reload's users and limits apply to
    /// the next batch.
    runtime: Arc<LiveRuntime>,
    spool: Spool,
    namer: Arc<MaildirNamer>,
    worker: DeliveryThread,
    rx: mpsc::UnboundedReceiver<MsgId>,
    schedule: Schedule,
    ready: VecDeque<MsgId>,
    /// Messages whose spool state may lag their mailboxes: recovered at
    /// start-up (the crash may have come between a copy and its record) or
    /// whose last outcome could not be recorded. Their next attempt is a
    /// redelivery; so is any retry of a deferred recipient.
    unrecorded: HashSet<MsgId>,
}

/// Starts the queue manager; it runs until `shutdown` is cancelled, then
/// finishes the batch in hand. `worker` is started by the caller: the
/// server starts it before the async runtime (see `server::prepare`), so
/// that it alone holds the mailbox capabilities.
pub fn start(
    runtime: Arc<LiveRuntime>,
    spool: Spool,
    worker: DeliveryThread,
    outbound: OutboundHandle,
    shutdown: CancellationToken,
) -> (QueueHandle, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let namer = Arc::new(MaildirNamer::new(&runtime.load().hostname));
    let mut queue = Queue {
        runtime,
        spool,
        namer,
        worker,
        rx,
        schedule: Schedule::default(),
        ready: VecDeque::new(),
        unrecorded: HashSet::new(),
    };
    queue.load_spool();
    let handle = tokio::spawn(async move { queue.run(shutdown).await });
    (QueueHandle { tx, outbound }, handle)
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

impl Queue {
    /// After a restart every live message with local work goes back on the
    /// schedule: pending at once, deferred at its next attempt time.
    fn load_spool(&mut self) {
        for (id, envelope) in self.spool.live() {
            if let Some(at) = next_local_attempt(&envelope) {
                self.schedule.insert(at, id);
                self.unrecorded.insert(id);
            }
        }
    }

    async fn run(&mut self, shutdown: CancellationToken) {
        loop {
            let batch_size = self.runtime.load().delivery.batch_size;
            // Retries (and everything recovered at start) first: under
            // sustained load new mail alone would fill every batch.
            self.schedule.take_due(now(), batch_size, &mut self.ready);
            while self.ready.len() < batch_size {
                match self.rx.try_recv() {
                    Ok(id) => self.ready.push_back(id),
                    Err(_) => break,
                }
            }
            if self.ready.is_empty() {
                let sleep = match self.schedule.next_due() {
                    Some(at) => Duration::from_secs((at - now()).max(0) as u64 + 1),
                    None => Duration::from_secs(3600),
                };
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    id = self.rx.recv() => match id {
                        Some(id) => self.ready.push_back(id),
                        None => return,
                    },
                    _ = tokio::time::sleep(sleep) => {}
                }
                continue;
            }
            let take = self.ready.len().min(batch_size);
            let batch: Vec<MsgId> = self.ready.drain(..take).collect();
            self.deliver(batch).await;
            if shutdown.is_cancelled() {
                return;
            }
            // New mail may fill at most three quarters of the next batch:
            // the rest stays for retries that come due meanwhile.
            self.linger(batch_size - batch_size / 4, &shutdown).await;
            if shutdown.is_cancelled() {
                return;
            }
        }
    }

    /// Right after a batch, while mail keeps arriving, waits up to
    /// [`LINGER`] for a fuller next batch: a batch's syncs cost the same
    /// for 30 messages as for 200. Never when idle: a message arriving at a
    /// quiet queue is delivered at once.
    async fn linger(&mut self, batch_size: usize, shutdown: &CancellationToken) {
        let deadline = tokio::time::Instant::now() + LINGER;
        let mut arrived = false;
        while self.ready.len() < batch_size {
            match self.rx.try_recv() {
                Ok(id) => {
                    self.ready.push_back(id);
                    arrived = true;
                    continue;
                }
                Err(_) if !arrived => return,
                Err(_) => {}
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                id = self.rx.recv() => match id {
                    Some(id) => self.ready.push_back(id),
                    None => return,
                },
                _ = tokio::time::sleep_until(deadline) => return,
            }
        }
    }

    /// One delivery attempt for the local recipients of every message in `batch`.
    async fn deliver(&mut self, batch: Vec<MsgId>) {
        let at = now();
        let mut jobs: Vec<LocalJob> = Vec::new();
        let mut bytes = 0u64;
        // One job per message: two in one batch would write the same copy
        // under the same name twice.
        let mut taken = HashSet::with_capacity(batch.len());
        let mut ids = batch.into_iter();
        while let Some(id) = ids.next() {
            if !taken.insert(id) {
                continue;
            }
            let Some(envelope) = self.spool.get(id) else {
                continue;
            };
            if !jobs.is_empty() && bytes + envelope.size > BATCH_BYTES {
                // Bodies are held in memory for the batch: leave the rest
                // for the next one, in order.
                let rest: Vec<MsgId> = std::iter::once(id).chain(ids).collect();
                for id in rest.into_iter().rev() {
                    self.ready.push_front(id);
                }
                break;
            }
            let due: Vec<usize> = envelope
                .recipients
                .iter()
                .enumerate()
                .filter(|(_, r)| is_local_due(&r.route, &r.status, at))
                .map(|(i, _)| i)
                .collect();
            if due.is_empty() {
                self.maybe_finish(id).await;
                continue;
            }
            bytes += envelope.size;
            let redelivery = self.unrecorded.contains(&id);
            jobs.push(LocalJob {
                id,
                envelope,
                due,
                redelivery,
            });
        }
        if jobs.is_empty() {
            return;
        }
        let results = self.write_maildirs(&jobs).await;
        self.record(jobs, results, at).await;
    }

    /// One job on the delivery thread for the whole batch: read every body
    /// from the spool, then write every copy (a thread hand-off per message
    /// was the largest cost of delivery). One result per due recipient, in
    /// order.
    async fn write_maildirs(&self, jobs: &[LocalJob]) -> Vec<Result<Delivered, String>> {
        // Per due recipient: its job, its copy and its mailbox. A user
        // removed from the config since acceptance is deferred right here
        // (kept until an administrator decides), never written anywhere.
        let runtime = self.runtime.load_full();
        let mut plan: Vec<(usize, CopyKey, bool, CopyTarget)> = Vec::new();
        for (j, job) in jobs.iter().enumerate() {
            let LocalJob {
                id, envelope, due, ..
            } = job;
            for &i in due {
                let rcpt = &envelope.recipients[i];
                let user = match &rcpt.route {
                    Route::Local { mailbox } => runtime.users.get(mailbox),
                    Route::Remote => None,
                };
                let target = match user {
                    Some(user) => {
                        let prefix = format!(
                            "Return-Path: <{}>\r\nDelivered-To: {}\r\n",
                            envelope.sender, rcpt.address
                        );
                        Ok((user.maildir.clone(), prefix.into_bytes(), user.access))
                    }
                    None => Err("mailbox no longer configured".to_string()),
                };
                let key = CopyKey {
                    queue_id: *id,
                    received_at: envelope.received_at,
                    rcpt: i,
                };
                // A deferral may have come after the copy was in place (a
                // failed sync of new/ keeps an earlier attempt's copy).
                let redelivery =
                    job.redelivery || matches!(rcpt.status, RcptStatus::Deferred { .. });
                plan.push((j, key, redelivery, target));
            }
        }
        let ids: Vec<MsgId> = jobs.iter().map(|j| j.id).collect();
        let (spool, namer) = (self.spool.clone(), self.namer.clone());
        let total = plan.len();
        let outcome = self
            .worker
            .run(move || {
                let bodies: Vec<Result<Vec<u8>, String>> = spool
                    .read_bodies_blocking(&ids)
                    .into_iter()
                    .zip(&ids)
                    .map(|(body, id)| {
                        body.map_err(|e| {
                            warn!(event = "delivery.body_unreadable", queue_id = %id, error = %e);
                            format!("message unreadable in the spool: {e}")
                        })
                    })
                    .collect();
                let copies: Vec<LocalCopy<'_>> = plan
                    .iter()
                    .filter_map(|(j, key, redelivery, target)| match (target, &bodies[*j]) {
                        (Ok((maildir, prefix, access)), Ok(body)) => Some(LocalCopy {
                            maildir,
                            access: *access,
                            prefix,
                            body,
                            key: *key,
                            redelivery: *redelivery,
                        }),
                        _ => None,
                    })
                    .collect();
                let mut written = deliver_batch(&namer, &copies).into_iter();
                plan.iter()
                    .map(|(j, _, _, target)| match (target, &bodies[*j]) {
                        (Ok(_), Ok(_)) => written
                            .next()
                            .unwrap_or_else(|| Err(std::io::Error::other("no result")))
                            .map_err(|e| e.to_string()),
                        (Err(e), _) | (_, Err(e)) => Err(e.clone()),
                    })
                    .collect::<Vec<_>>()
            })
            .await;
        outcome.unwrap_or_else(|e| vec![Err(format!("maildir writer failed: {e}")); total])
    }

    /// Writes every outcome (all in one group commit), reschedules
    /// deferrals and finishes completed messages.
    async fn record(
        &mut self,
        jobs: Vec<LocalJob>,
        results: Vec<Result<Delivered, String>>,
        at: i64,
    ) {
        let delivery = self.runtime.load().delivery.clone();
        let mut results = results.into_iter();
        let mut outcomes = Vec::with_capacity(jobs.len());
        let mut recorded_jobs = Vec::with_capacity(jobs.len());
        for LocalJob {
            id,
            mut envelope,
            due,
            ..
        } in jobs
        {
            let mut changes = Vec::new();
            for i in due {
                let result = results.next().unwrap_or_else(|| Err("no result".into()));
                let rcpt = &envelope.recipients[i];
                let status = match result {
                    Ok(delivered) => {
                        let copy = match delivered {
                            Delivered::Written => "written",
                            Delivered::EarlierInNew => "earlier copy in new/",
                            Delivered::EarlierInCur => "earlier copy in cur/",
                        };
                        info!(event = "delivery.result", queue_id = %id, rcpt = %rcpt.address, route = "maildir", status = "delivered", copy);
                        metrics::delivery(DeliveryClass::Maildir, DeliveryOutcome::Delivered);
                        RcptStatus::Delivered {
                            reply: "250 2.0.0 delivered to maildir".into(),
                            at,
                        }
                    }
                    Err(e) => {
                        let attempts = match &rcpt.status {
                            RcptStatus::Deferred { attempts, .. } => attempts + 1,
                            _ => 1,
                        };
                        let jitter = rand::rng().random::<f64>();
                        let delay =
                            backoff(delivery.retry_initial, delivery.retry_max, attempts, jitter);
                        warn!(event = "delivery.result", queue_id = %id, rcpt = %rcpt.address, route = "maildir", status = "deferred", error = %e, retry_in = ?delay);
                        metrics::delivery(DeliveryClass::Maildir, DeliveryOutcome::Deferred);
                        RcptStatus::Deferred {
                            reply: format!("451 4.3.0 {e}"),
                            attempts,
                            next_attempt: at + whole_seconds_after(delay),
                            delay_notified: false,
                        }
                    }
                };
                envelope.recipients[i].status = status.clone();
                changes.push((i, status));
            }
            // A message whose recipients are all final needs only its DONE
            // record: one group commit instead of two per batch.
            let done = envelope.all_final();
            outcomes.push(if done {
                Outcome::Done(id)
            } else {
                Outcome::State(id, changes)
            });
            recorded_jobs.push((id, envelope, done));
        }
        let results = self.spool.record_many(outcomes).await;
        for ((id, envelope, done), recorded) in recorded_jobs.into_iter().zip(results) {
            let next = match recorded {
                Ok(()) if done => {
                    info!(event = "queue.done", queue_id = %id);
                    self.unrecorded.remove(&id);
                    None
                }
                Ok(()) => {
                    self.unrecorded.remove(&id);
                    // Outbound delivery may have made the other recipients
                    // final meanwhile (its record came first and saw ours
                    // pending).
                    self.maybe_finish(id).await;
                    next_local_attempt(&envelope)
                }
                Err(e) => {
                    warn!(event = "queue.record_failed", queue_id = %id, error = %e);
                    self.unrecorded.insert(id);
                    Some(at + whole_seconds_after(delivery.retry_initial))
                }
            };
            if let Some(next) = next {
                self.schedule.insert(next, id);
            }
        }
    }

    /// Finishes `id` if every recipient is final in the spool's current
    /// view (outbound delivery records its recipients on its own).
    async fn maybe_finish(&mut self, id: MsgId) {
        if !self.spool.get(id).is_some_and(|env| env.all_final()) {
            return;
        }
        match self.spool.finish(id).await {
            // NotFound: outbound delivery finished it first.
            Ok(()) | Err(SpoolError::NotFound(_)) => {
                self.unrecorded.remove(&id);
            }
            Err(e) => warn!(event = "queue.finish_failed", queue_id = %id, error = %e),
        }
    }
}

/// A retry delay in the whole seconds the schedule keeps, rounded up and
/// at least one: truncating 0.95 s (1 s minus jitter) to 0 made a deferred
/// delivery retry at once, thousands of times a second.
fn whole_seconds_after(delay: Duration) -> i64 {
    let secs = delay.as_secs() + u64::from(delay.subsec_nanos() > 0);
    i64::try_from(secs.max(1)).unwrap_or(i64::MAX)
}

fn is_local_due(route: &Route, status: &RcptStatus, now: i64) -> bool {
    matches!(route, Route::Local { .. })
        && match status {
            RcptStatus::Pending => true,
            RcptStatus::Deferred { next_attempt, .. } => *next_attempt <= now,
            _ => false,
        }
}

/// When this message next has local work, if ever.
fn next_local_attempt(envelope: &Envelope) -> Option<i64> {
    envelope
        .recipients
        .iter()
        .filter(|r| matches!(r.route, Route::Local { .. }))
        .filter_map(|r| match &r.status {
            RcptStatus::Pending => Some(i64::MIN),
            RcptStatus::Deferred { next_attempt, .. } => Some(*next_attempt),
            _ => None,
        })
        .min()
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_retry_delay_is_never_rounded_down_to_now() {
        assert_eq!(whole_seconds_after(Duration::from_millis(950)), 1);
        assert_eq!(whole_seconds_after(Duration::ZERO), 1);
        assert_eq!(whole_seconds_after(Duration::from_secs(2)), 2);
        assert_eq!(whole_seconds_after(Duration::from_millis(2001)), 3);
        // 1 s with the most jitter still waits.
        let d = backoff(Duration::from_secs(1), Duration::from_secs(1), 1, 1.0);
        assert!(d < Duration::from_secs(1));
        assert_eq!(whole_seconds_after(d), 1);
    }

    use super::*;

    #[test]
    fn schedule_releases_only_due_messages_in_time_order() {
        let mut s = Schedule::default();
        s.insert(50, MsgId(1));
        s.insert(10, MsgId(2));
        s.insert(30, MsgId(3));
        let mut out = VecDeque::new();
        s.take_due(5, 10, &mut out);
        assert!(out.is_empty());
        s.take_due(30, 10, &mut out);
        assert_eq!(out.iter().map(|m| m.0).collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!(s.next_due(), Some(50));
        out.clear();
        s.insert(0, MsgId(4));
        s.take_due(100, 1, &mut out);
        assert_eq!(out.iter().map(|m| m.0).collect::<Vec<_>>(), vec![4]);
    }
}

#[cfg(test)]
mod run_tests {
    //! The queue manager end to end over a real spool and Maildir.
    use super::*;
    use crate::config::Runtime;
    use crate::spool::tests::wait_until;
    use crate::spool::{Recipient, SpoolConfig};

    const LOCAL: Work = Work {
        local: true,
        remote: false,
    };

    fn local_envelope() -> Envelope {
        let mut env = crate::spool::tests::envelope(1);
        env.recipients = vec![Recipient {
            address: "alice@example.test".into(),
            original: "alice@example.test".into(),
            orcpt: None,
            notify: None,
            route: Route::Local {
                mailbox: "alice".into(),
            },
            status: RcptStatus::Pending,
        }];
        env
    }

    async fn commit(spool: &Spool, body: &[u8]) -> MsgId {
        let mut d = spool.draft();
        d.write(body).await.unwrap();
        spool.commit(local_envelope(), d).await.unwrap()
    }

    /// These tests have no remote recipients: nobody listens outbound.
    fn outbound() -> OutboundHandle {
        OutboundHandle::channel().0
    }

    /// The server starts it before the runtime; a test starts its own.
    fn worker() -> DeliveryThread {
        DeliveryThread::start(crate::deliver::worker::DELIVERY_NICE).unwrap()
    }

    fn delivered(dir: &std::path::Path) -> usize {
        std::fs::read_dir(dir.join("mail/alice/Maildir/new")).map_or(0, |d| d.count())
    }

    fn live(runtime: &Arc<Runtime>) -> Arc<LiveRuntime> {
        Arc::new(LiveRuntime::from(runtime.clone()))
    }

    fn runtime(dir: &std::path::Path) -> Arc<Runtime> {
        let toml = format!(
            "hostname = \"mx.test\"\ndata_dir = \"{}\"\n[[listener]]\naddress = \"127.0.0.1:0\"\n\
             [local]\ndomains = [\"example.test\"]\n[[user]]\nname = \"alice\"\n\
             addresses = [\"alice@example.test\"]\n[delivery]\nretry_initial = \"1s\"\n",
            dir.display()
        );
        Arc::new(crate::config::parse(&toml, dir).unwrap())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn delivers_bursts_and_stops_promptly_when_told() {
        let tmp = tempfile::tempdir().unwrap();
        let runtime = runtime(tmp.path());
        let (spool, _) = Spool::open(SpoolConfig::new(runtime.spool.dir.clone())).unwrap();
        let shutdown = CancellationToken::new();
        let (queue, task) = start(
            live(&runtime),
            spool.clone(),
            worker(),
            outbound(),
            shutdown.clone(),
        );
        // One message at a quiet queue, then a burst (which lingers).
        let first = commit(&spool, b"Subject: one\r\n\r\n1\r\n").await;
        queue.notify(first, LOCAL);
        wait_until(|| delivered(tmp.path()) == 1).await;
        let mut burst = Vec::new();
        for i in 0..40 {
            let id = commit(&spool, format!("Subject: {i}\r\n\r\nx\r\n").as_bytes()).await;
            queue.notify(id, LOCAL);
            burst.push(id);
        }
        wait_until(|| delivered(tmp.path()) == 41).await;
        // Delivered messages are finished in the spool (DONE written).
        wait_until(|| spool.live().is_empty()).await;
        // More mail arrives and shutdown comes while the queue lingers.
        for _ in 0..5 {
            let id = commit(&spool, b"Subject: late\r\n\r\nx\r\n").await;
            queue.notify(id, LOCAL);
        }
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the queue manager stops within 5 s")
            .unwrap();
        // Whatever it did not deliver is still safe in the spool.
        assert_eq!(delivered(tmp.path()) + spool.live().len(), 46);
    }

    /// A crash came between a copy's move into new/ and the spool's record
    /// of it: the restarted queue finds that copy (still in new/, or in cur/
    /// once read) and finishes the message without writing a second one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_copy_delivered_before_a_crash_is_not_written_again() {
        for read in [false, true] {
            let tmp = tempfile::tempdir().unwrap();
            let runtime = runtime(tmp.path());
            let (spool, _) = Spool::open(SpoolConfig::new(runtime.spool.dir.clone())).unwrap();
            let body = b"Subject: once\r\n\r\nx\r\n";
            let id = commit(&spool, body).await;
            let envelope = spool.get(id).unwrap();
            let copy = [
                format!(
                    "Return-Path: <{}>\r\nDelivered-To: {}\r\n",
                    envelope.sender, envelope.recipients[0].address
                )
                .as_bytes(),
                body,
            ]
            .concat();
            let key = CopyKey {
                queue_id: id,
                received_at: envelope.received_at,
                rcpt: 0,
            };
            let name = MaildirNamer::new(&runtime.hostname).name(&key, copy.len());
            let maildir = runtime.users.get("alice").unwrap().maildir.clone();
            for sub in ["tmp", "new", "cur"] {
                std::fs::create_dir_all(maildir.join(sub)).unwrap();
            }
            let earlier = match read {
                false => maildir.join("new").join(&name),
                true => maildir.join("cur").join(format!("{name}:2,S")),
            };
            std::fs::write(&earlier, &copy).unwrap();
            // The start-up after the crash.
            let shutdown = CancellationToken::new();
            let (_queue, task) = start(
                live(&runtime),
                spool.clone(),
                worker(),
                outbound(),
                shutdown.clone(),
            );
            wait_until(|| spool.live().is_empty()).await;
            shutdown.cancel();
            task.await.unwrap();
            let count = |sub: &str| std::fs::read_dir(maildir.join(sub)).unwrap().count();
            assert_eq!(
                (count("new"), count("cur"), count("tmp")),
                (usize::from(!read), usize::from(read), 0)
            );
            assert_eq!(std::fs::read(&earlier).unwrap(), copy);
        }
    }

    /// The spool cannot record a delivered copy (a failed write): the retry
    /// finds the copy instead of writing a second one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_copy_whose_delivery_was_not_recorded_is_not_written_again() {
        let tmp = tempfile::tempdir().unwrap();
        let runtime = runtime(tmp.path());
        let (spool, _) = Spool::open(SpoolConfig::new(runtime.spool.dir.clone())).unwrap();
        let shutdown = CancellationToken::new();
        let (queue, task) = start(
            live(&runtime),
            spool.clone(),
            worker(),
            outbound(),
            shutdown.clone(),
        );
        let id = commit(&spool, b"Subject: once\r\n\r\nx\r\n").await;
        spool.faults().fail_writes(1);
        queue.notify(id, LOCAL);
        wait_until(|| spool.live().is_empty()).await;
        shutdown.cancel();
        task.await.unwrap();
        assert_eq!(delivered(tmp.path()), 1);
    }
}
