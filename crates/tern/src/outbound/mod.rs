//! The outbound manager: takes messages with recipients for other hosts
//! from the spool, asks the [`Scheduler`] which to attempt where and when,
//! runs each attempt on a task of its own (route, connect, send), and
//! records every recipient's outcome in the spool.
//!
//! The message path, for a recipient routed [`Route::Remote`]:
//! 1. [`OutboundHandle::notify`] (after the spool's commit) or the start-up
//!    scan hands the message to the manager, which adds each pending
//!    recipient to the scheduler under its destination (`mx:example.org`,
//!    `relay:[10.0.0.1]:25`, `lmtp:unix:/run/dovecot/lmtp`; no DNS yet).
//! 2. [`Scheduler::poll`] hands out jobs (one message, its recipients for one
//!    destination) within each destination's window and rate.
//! 3. A connection task ([`attempt`]) routes the destination afresh (DNS,
//!    configured routes: a config or DNS change applies to queued mail),
//!    reads the body from the spool and delivers it with the SMTP/LMTP
//!    driver. It then asks the manager for the destination's next job, so a
//!    busy destination's messages follow each other.
//! 4. The manager tells the scheduler the outcome (windows, rates, dead
//!    destinations, backoff) and a settle task ([`settle`]) records it in the
//!    spool (group commit), queues bounces and delay notices first, and
//!    finishes the message once every recipient is final.
//!
//! Invariants: the scheduler is owned by the manager task alone; a
//! recipient's spool state changes only after its outcome is known; a bounce
//! is committed before the failure it reports is recorded (a crash between
//! the two repeats the bounce, never loses it); a message leaves the spool
//! only when every recipient, local ones included, is final.
//!
//! Not done: the learned windows and rates start afresh after a restart.
//!
//! Errors: none returned. A spool error while recording leaves the
//! recipient as it was in the spool and in the scheduler's retry: it is
//! attempted again (a duplicate, never a loss).

mod admin;
mod attempt;
mod idle;
mod settle;

pub use admin::{NewConfig, QueueOp};

use crate::config::Runtime;
use crate::egress::Egress;
use crate::queue::QueueHandle;
use crate::scheduler::{
    Destination, Job, JobReport, Millis, NewRecipient, RatePolicy, RetryPolicy, Scheduler,
    SchedulerConfig, WindowPolicy,
};
use crate::spool::{Envelope, MsgId, RcptStatus, Route, Spool};
use attempt::{AttemptContext, Finished};
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// Cheap handle for announcing a committed message with remote recipients.
#[derive(Clone)]
pub struct OutboundHandle {
    tx: mpsc::UnboundedSender<MsgId>,
}

impl OutboundHandle {
    pub fn notify(&self, id: MsgId) {
        // Closed means shutdown: the message is in the spool for the next start.
        let _ = self.tx.send(id);
    }

    /// A handle and the receiver [`start`] takes: made first, because the
    /// queue's handle (which bounces are announced through) carries this one.
    pub fn channel() -> (OutboundHandle, OutboundReceiver) {
        let (tx, rx) = mpsc::unbounded_channel();
        (OutboundHandle { tx }, OutboundReceiver(rx))
    }
}

/// The receiving end of [`OutboundHandle::channel`].
pub struct OutboundReceiver(mpsc::UnboundedReceiver<MsgId>);

/// Unix time in milliseconds, the scheduler's clock.
pub(crate) fn now_millis() -> Millis {
    chrono::Utc::now().timestamp_millis()
}

/// Unix seconds (the spool's and `tern queue`'s unit) from the scheduler's
/// milliseconds, rounded up: a retry is never recorded as due before the
/// scheduler will try it.
pub(crate) fn seconds(at: Millis) -> i64 {
    at.div_euclid(1000) + i64::from(at.rem_euclid(1000) != 0)
}

/// The scheduler's settings from the validated configuration.
pub fn scheduler_config(runtime: &Runtime) -> SchedulerConfig {
    let o = &runtime.outbound;
    SchedulerConfig {
        retry: RetryPolicy {
            first_retry: runtime.delivery.retry_initial,
            max_retry: runtime.delivery.retry_max,
            give_up: runtime.delivery.give_up,
        },
        window: WindowPolicy {
            initial: o.window_initial,
            max: o.window_max,
        },
        rate: RatePolicy::default(),
        max_in_flight: o.max_connections,
        max_recipients_per_job: o.max_recipients_per_job,
        dead_after: o.dead_after,
        // `tern queue flush` means "now", as postqueue -f: the windows and
        // max_connections already bound how much starts at once.
        flush_spread: Duration::ZERO,
    }
}

struct Manager {
    spool: Spool,
    scheduler: Scheduler,
    context: Arc<AttemptContext>,
    rx: mpsc::UnboundedReceiver<MsgId>,
    finished_tx: mpsc::UnboundedSender<Finished>,
    finished_rx: mpsc::UnboundedReceiver<Finished>,
    /// Per recipient in the scheduler: the server that gave its last reply,
    /// for `tern queue` (the spool keeps the reply, not who gave it).
    answered_by: HashMap<(MsgId, usize), String>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    admin_rx: mpsc::Receiver<AdminRequest>,
    idle: idle::IdleConnections,
    /// Messages on hold (persisted in `held_path`).
    held: BTreeSet<MsgId>,
    held_path: PathBuf,
    /// Whose mail is held (the circuit breaker), and where remote refusals
    /// of a user's recipients are counted.
    egress: Arc<Egress>,
    /// Users the breaker just tripped: their queued mail is held.
    tripped: mpsc::UnboundedReceiver<String>,
}

/// A `tern queue` command and where its answer goes.
pub type AdminRequest = (QueueOp, oneshot::Sender<Result<serde_json::Value, String>>);

/// Sends `tern queue` commands to the running manager.
#[derive(Clone)]
pub struct AdminHandle(mpsc::Sender<AdminRequest>);

impl AdminHandle {
    /// The manager's answer; an error when it has stopped.
    pub async fn request(&self, op: QueueOp) -> Result<serde_json::Value, String> {
        let (tx, rx) = oneshot::channel();
        self.0
            .send((op, tx))
            .await
            .map_err(|_| "the queue manager has stopped".to_string())?;
        rx.await
            .unwrap_or_else(|_| Err("the queue manager has stopped".into()))
    }
}

/// Starts the outbound manager; it runs until `shutdown` is cancelled, then
/// lets the attempts in flight finish their message (bounded by their
/// timeouts) and returns. Fails only if the DNS resolver cannot be set up.
pub fn start(
    runtime: Arc<Runtime>,
    spool: Spool,
    queue: QueueHandle,
    receiver: OutboundReceiver,
    egress: Arc<Egress>,
    tripped: mpsc::UnboundedReceiver<String>,
    shutdown: CancellationToken,
) -> Result<(AdminHandle, tokio::task::JoinHandle<()>), String> {
    let context = Arc::new(AttemptContext::new(runtime.clone(), spool.clone(), queue)?);
    let (admin_tx, admin_rx) = mpsc::channel(16);
    let held_path = admin::held_path(&runtime.data_dir);
    let (finished_tx, finished_rx) = mpsc::unbounded_channel();
    let seed = rand::random();
    let mut manager = Manager {
        spool,
        scheduler: Scheduler::new(scheduler_config(&runtime), seed),
        context,
        rx: receiver.0,
        finished_tx,
        finished_rx,
        answered_by: HashMap::new(),
        tasks: TaskTracker::new(),
        shutdown,
        admin_rx,
        idle: idle::IdleConnections::default(),
        held: admin::load_held(&held_path),
        held_path,
        egress,
        tripped,
    };
    manager.load_spool();
    let task = tokio::spawn(async move { manager.run().await });
    Ok((AdminHandle(admin_tx), task))
}

impl Manager {
    /// After a restart every live message with remote work goes back to the
    /// scheduler: pending at once, deferred at its next attempt time.
    fn load_spool(&mut self) {
        let now = now_millis();
        for (id, envelope) in self.spool.live() {
            self.add(id, &envelope, now);
            if self.user_held(&envelope) {
                self.scheduler.hold(id);
            }
        }
        // Holds of messages finished since are forgotten.
        self.held.retain(|id| self.spool.get(*id).is_some());
        for &id in &self.held {
            self.scheduler.hold(id);
        }
    }

    /// Whether `envelope` was submitted by a user the breaker holds.
    fn user_held(&self, envelope: &Envelope) -> bool {
        envelope
            .auth_user
            .as_deref()
            .is_some_and(|u| self.egress.is_held(u))
    }

    fn add(&mut self, id: MsgId, envelope: &Envelope, now: Millis) {
        let recipients: Vec<NewRecipient> = envelope
            .recipients
            .iter()
            .enumerate()
            .filter(|(_, r)| r.route == Route::Remote)
            .filter_map(|(i, r)| {
                let (attempts, due, last_reply) = match &r.status {
                    RcptStatus::Pending => (0, now, None),
                    RcptStatus::Deferred {
                        reply,
                        attempts,
                        next_attempt,
                        ..
                    } => (
                        *attempts,
                        next_attempt.saturating_mul(1000),
                        Some(reply.clone()),
                    ),
                    _ => return None,
                };
                Some(NewRecipient {
                    rcpt: i,
                    destination: self.context.destination_of(&r.address),
                    attempts,
                    due,
                    last_reply,
                })
            })
            .collect();
        if !recipients.is_empty() {
            let received = envelope.received_at.saturating_mul(1000);
            self.scheduler.add(id, received, recipients, now);
        }
    }

    async fn run(&mut self) {
        loop {
            let now = now_millis();
            let poll = self.scheduler.poll(now);
            if !poll.expired.is_empty() {
                settle::expired(self.context.clone(), &self.tasks, poll.expired, now);
            }
            for job in poll.jobs {
                self.start_connection(job);
            }
            let wakeup = [self.scheduler.next_wakeup(), self.idle.next_deadline()]
                .into_iter()
                .flatten()
                .min();
            let sleep = match wakeup {
                Some(at) => Duration::from_millis((at - now_millis()).clamp(1, 3_600_000) as u64),
                None => Duration::from_secs(3600),
            };
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                id = self.rx.recv() => match id {
                    Some(id) => {
                        self.take_new(id);
                        // A burst of commits costs one poll, not one each.
                        while let Ok(id) = self.rx.try_recv() {
                            self.take_new(id);
                        }
                    }
                    None => break,
                },
                Some(done) = self.finished_rx.recv() => self.finish(done),
                Some(user) = self.tripped.recv() => self.hold_user(&user),
                Some((op, reply)) = self.admin_rx.recv() => {
                    let answer = self.queue_op(op).await;
                    let _ = reply.send(answer);
                }
                _ = tokio::time::sleep(sleep) => self.idle.expire(now_millis()),
            }
        }
        self.idle.close_all();
        self.drain().await;
    }

    fn take_new(&mut self, id: MsgId) {
        if let Some(envelope) = self.spool.get(id) {
            self.add(id, &envelope, now_millis());
            if self.held.contains(&id) || self.user_held(&envelope) {
                self.scheduler.hold(id);
            }
        }
    }

    /// A connection task for `job`'s destination: it carries this job and
    /// asks for the destination's next ones while it can.
    fn start_connection(&mut self, job: Job) {
        let Some(envelope) = self.spool.get(job.msg) else {
            self.forget_job(&job, now_millis());
            return;
        };
        // An idle connection to the destination takes it: no handshake.
        let (job, envelope) = match self.idle.hand_over(job, envelope) {
            None => return,
            Some(back) => back,
        };
        let context = self.context.clone();
        let finished = self.finished_tx.clone();
        self.tasks
            .spawn(attempt::connection(context, job, envelope, finished));
    }

    /// Records a finished job: the scheduler learns from it, a settle task
    /// writes it to the spool, and the connection gets the destination's
    /// next job if one may start now.
    fn finish(&mut self, done: Finished) {
        let now = now_millis();
        let Finished {
            job,
            envelope,
            report,
            details,
            next,
        } = done;
        let settled = match self.scheduler.complete(job.id, &report, now) {
            Ok(settled) => settled,
            Err(e) => {
                warn!(event = "outbound.complete_failed", job = %job.id, error = %e);
                Vec::new()
            }
        };
        // Recipients refused for good by remote servers count toward the
        // submitting user's breaker (a list of bought or guessed addresses).
        if let Some(user) = &envelope.auth_user {
            for s in &settled {
                if s.fate == crate::scheduler::Fate::Failed {
                    self.egress.remote_reject(user, now);
                }
            }
        }
        // Who answered is kept only for recipients that will be tried again.
        for s in &settled {
            let key = (s.key.msg, s.key.rcpt);
            let host = match s.fate {
                crate::scheduler::Fate::Retry { .. } => details
                    .iter()
                    .find(|(i, _)| *i == s.key.rcpt)
                    .and_then(|(_, d)| d.answered_by.clone()),
                _ => None,
            };
            match host {
                Some(host) => self.answered_by.insert(key, host),
                None => self.answered_by.remove(&key),
            };
        }
        settle::job(
            self.context.clone(),
            &self.tasks,
            job.msg,
            envelope,
            settled,
            details,
            now,
        );
        if let Some(next) = next {
            if self.shutdown.is_cancelled() {
                let _ = next.send(None);
            } else if let Some(job) = self.next_for(&job.destination, now) {
                let _ = next.send(Some(job));
            } else {
                // Nothing due for it now: the connection waits a moment for
                // the destination's next job instead of closing at once.
                self.idle.park(job.destination.clone(), next, now);
            }
        }
    }

    /// A job whose message was finished or deleted meanwhile: nothing to
    /// send; the scheduler forgets the message and frees the job's place.
    fn forget_job(&mut self, job: &Job, now: Millis) {
        self.scheduler.delete(job.msg);
        let report = JobReport {
            connection: crate::scheduler::Connection::Established,
            recipients: Vec::new(),
        };
        let _ = self.scheduler.complete(job.id, &report, now);
    }

    /// The next job for a connection already open to `destination`, with
    /// its envelope.
    fn next_for(&mut self, destination: &Destination, now: Millis) -> Option<(Job, Envelope)> {
        loop {
            let job = self.scheduler.next_job_for(destination, now)?;
            match self.spool.get(job.msg) {
                Some(envelope) => return Some((job, envelope)),
                None => self.forget_job(&job, now),
            }
        }
    }

    /// At shutdown: attempts in flight finish the message they carry (their
    /// outcome is recorded), and take no new one; after [`DRAIN_GRACE`] the
    /// rest are abandoned (a slow server must not hold a restart for its
    /// data timeout): they are attempted again at the next start, so a
    /// message the server took meanwhile may arrive twice, never not at all.
    async fn drain(&mut self) {
        self.tasks.close();
        let deadline = tokio::time::Instant::now() + DRAIN_GRACE;
        loop {
            tokio::select! {
                _ = self.tasks.wait() => break,
                Some(done) = self.finished_rx.recv() => self.finish(done),
                _ = tokio::time::sleep_until(deadline) => {
                    warn!(event = "outbound.stopped", in_flight = self.scheduler.in_flight(), "delivery attempts still running at shutdown are abandoned and will be repeated");
                    return;
                }
            }
        }
        info!(event = "outbound.stopped");
    }
}

/// How long shutdown waits for delivery attempts in flight.
const DRAIN_GRACE: Duration = Duration::from_secs(10);

/// Sends `job` back when the connection can take another; `None` ends it.
pub(crate) type NextJob = oneshot::Sender<Option<(Job, Envelope)>>;

#[cfg(test)]
mod tests;
