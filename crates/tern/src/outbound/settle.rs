//! Recording outcomes: what the scheduler decided for each recipient of a
//! job becomes a spool status (group-committed with everyone else's), and a
//! message whose recipients are all final is finished.
//!
//! Invariants: a notice (bounce or delay notice) is committed to the spool
//! before the statuses it reports are recorded, so a crash between the two
//! repeats the notice and never loses it; `DONE` is written only when the
//! spool's own view, with this job's changes, has every recipient final
//! (another task may be recording other recipients of the same message; the
//! last of them to record sees them all final and finishes it).
//!
//! Errors: logged; a recipient whose status could not be recorded stays as
//! the spool had it and is attempted again after a restart.

use super::attempt::{AttemptContext, RcptDetail};
use super::seconds;
use crate::bounce::{Notice, NoticeContext, NoticeKind, NoticeRecipient, build_notice};
use crate::config::Resolution;
use crate::metrics::{self, DeliveryClass, DeliveryOutcome};
use crate::queue::Work;
use crate::scheduler::{Expired, Fate, Millis, Settled};
use crate::spool::{Envelope, MsgId, Outcome, RcptStatus, Recipient, Route, SpoolError};
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// Records the settled recipients of one finished job (on a task of its
/// own: the manager never waits for the disk).
pub(super) fn job(
    context: Arc<AttemptContext>,
    tasks: &TaskTracker,
    msg: MsgId,
    envelope: Envelope,
    settled: Vec<Settled>,
    details: Vec<(usize, RcptDetail)>,
    now: Millis,
) {
    if settled.is_empty() {
        return;
    }
    let details: BTreeMap<usize, RcptDetail> = details.into_iter().collect();
    tasks.spawn(async move {
        let mut changes = Vec::with_capacity(settled.len());
        let (mut failed, mut delayed) = (Vec::new(), Vec::new());
        let delay_due = context
            .runtime
            .delivery
            .delay_notice
            .is_some_and(|after| seconds(now) >= envelope.received_at + after.as_secs() as i64);
        for s in settled {
            let detail = details.get(&s.key.rcpt);
            let reply = detail.map_or_else(String::new, |d| d.reply.clone());
            let address = envelope
                .recipients
                .get(s.key.rcpt)
                .map_or("", |r| r.address.as_str());
            let answered_by = detail.and_then(|d| d.answered_by.clone());
            let host = answered_by.as_deref().unwrap_or("");
            let class = DeliveryClass::of_destination(context.destination_of(address).as_str());
            let notice = |will_retry_until| NoticeRecipient {
                index: s.key.rcpt,
                reply: reply.clone(),
                remote_host: answered_by.clone(),
                last_attempt: seconds(now),
                will_retry_until,
            };
            let status = match s.fate {
                Fate::Delivered => {
                    info!(event = "delivery.result", queue_id = %msg, rcpt = %address, status = "delivered", host, reply = %reply);
                    metrics::delivery(class, DeliveryOutcome::Delivered);
                    RcptStatus::Delivered {
                        reply,
                        at: seconds(now),
                    }
                }
                Fate::Failed => {
                    warn!(event = "delivery.result", queue_id = %msg, rcpt = %address, status = "failed", host, reply = %reply);
                    metrics::delivery(class, DeliveryOutcome::Failed);
                    failed.push(notice(None));
                    RcptStatus::Failed {
                        reply,
                        at: seconds(now),
                    }
                }
                Fate::Retry { at, attempts } => {
                    info!(event = "delivery.result", queue_id = %msg, rcpt = %address, status = "deferred", host, reply = %reply, attempts, retry_at = seconds(at));
                    metrics::delivery(class, DeliveryOutcome::Deferred);
                    let notified = was_delay_notified(&envelope, s.key.rcpt);
                    if delay_due && !notified {
                        let give_up = envelope.received_at
                            + context.runtime.delivery.give_up.as_secs() as i64;
                        delayed.push(notice(Some(give_up)));
                    }
                    RcptStatus::Deferred {
                        reply,
                        attempts,
                        next_attempt: seconds(at),
                        delay_notified: notified || delay_due,
                    }
                }
                Fate::Expired { attempts } => {
                    warn!(event = "delivery.result", queue_id = %msg, rcpt = %address, status = "expired", host, reply = %reply, attempts);
                    metrics::delivery(class, DeliveryOutcome::Failed);
                    let status = expired_status(&reply, attempts, now);
                    if let RcptStatus::Failed { reply, .. } = &status {
                        failed.push(NoticeRecipient {
                            reply: reply.clone(),
                            ..notice(None)
                        });
                    }
                    status
                }
            };
            changes.push((s.key.rcpt, status));
        }
        let notices = [(NoticeKind::Failure, failed), (NoticeKind::Delay, delayed)];
        if !send_notices(&context, msg, &envelope, &notices, now).await {
            // Record nothing the notice was to report: after a restart the
            // recipients are attempted again and reported then.
            let unreported: Vec<usize> = notices
                .iter()
                .flat_map(|(_, r)| r.iter().map(|r| r.index))
                .collect();
            changes.retain(|(i, _)| !unreported.contains(i));
        }
        record(&context, msg, changes).await;
    });
}

/// Records recipients that reached their give-up time while waiting.
pub(super) fn expired(
    context: Arc<AttemptContext>,
    tasks: &TaskTracker,
    expired: Vec<Expired>,
    now: Millis,
) {
    let mut by_msg: BTreeMap<MsgId, Vec<(usize, RcptStatus)>> = BTreeMap::new();
    for e in expired {
        let reply = e.last_reply.unwrap_or_default();
        warn!(event = "delivery.result", queue_id = %e.key.msg, destination = %e.destination, status = "expired", reply = %reply, attempts = e.attempts);
        by_msg
            .entry(e.key.msg)
            .or_default()
            .push((e.key.rcpt, expired_status(&reply, e.attempts, now)));
    }
    tasks.spawn(async move {
        for (msg, changes) in by_msg {
            let Some(envelope) = context.spool.get(msg) else {
                continue;
            };
            let failed: Vec<NoticeRecipient> = changes
                .iter()
                .map(|(i, status)| NoticeRecipient {
                    index: *i,
                    reply: match status {
                        RcptStatus::Failed { reply, .. } => reply.clone(),
                        _ => String::new(),
                    },
                    remote_host: None,
                    last_attempt: seconds(now),
                    will_retry_until: None,
                })
                .collect();
            let notices = [(NoticeKind::Failure, failed)];
            if send_notices(&context, msg, &envelope, &notices, now).await {
                record(&context, msg, changes).await;
            }
        }
    });
}

/// Builds and spools the notices (bounce, delay notice) about `msg`, each
/// with the null sender, and announces them to the queue. False when one
/// that was due could not be spooled.
async fn send_notices(
    context: &AttemptContext,
    msg: MsgId,
    envelope: &Envelope,
    notices: &[(NoticeKind, Vec<NoticeRecipient>)],
    now: Millis,
) -> bool {
    if notices.iter().all(|(_, rcpts)| rcpts.is_empty()) {
        return true;
    }
    let original = match context.spool.read_body(msg).await {
        Ok(body) => body,
        Err(e) => {
            warn!(event = "notice.failed", queue_id = %msg, error = %e, "cannot read the original for the notice");
            return false;
        }
    };
    let runtime = &context.runtime;
    let postmaster = runtime
        .users
        .get(&runtime.postmaster)
        .map(|u| u.primary_address.clone())
        .unwrap_or_else(|| format!("postmaster@{}", runtime.hostname));
    let ctx = NoticeContext {
        reporting_mta: &runtime.hostname,
        queue_id: msg,
        envelope,
        original: &original,
        now: seconds(now),
        postmaster: &postmaster,
    };
    let mut all_sent = true;
    for (kind, rcpts) in notices {
        if rcpts.is_empty() {
            continue;
        }
        let Some(notice) = build_notice(&ctx, *kind, rcpts) else {
            continue;
        };
        match spool_notice(context, &notice).await {
            Ok(id) => {
                info!(event = "notice.queued", queue_id = %msg, notice_id = %id, kind = ?kind, to = %notice.to, recipients = rcpts.len());
            }
            Err(e) => {
                warn!(event = "notice.failed", queue_id = %msg, kind = ?kind, to = %notice.to, error = %e);
                all_sent = false;
            }
        }
    }
    all_sent
}

/// Commits a notice as a message from `<>` to its recipient, routed like
/// any recipient: our own users' Maildirs (alias expansion included), or
/// outbound.
async fn spool_notice(context: &AttemptContext, notice: &Notice) -> Result<MsgId, String> {
    let runtime = &context.runtime;
    let (local, domain) = notice
        .to
        .rsplit_once('@')
        .unwrap_or((notice.to.as_str(), ""));
    let routes: Vec<(String, Route)> = match runtime.resolve(local, domain) {
        Resolution::Relay => vec![(notice.to.clone(), Route::Remote)],
        Resolution::Local(list) => crate::policy::local_routes(runtime, list),
        Resolution::Unknown => return Err(format!("{} is no longer a local address", notice.to)),
    };
    let envelope = Envelope {
        sender: String::new(),
        recipients: routes
            .into_iter()
            .map(|(address, route)| Recipient {
                address,
                original: notice.to.clone(),
                orcpt: None,
                notify: None,
                route,
                status: RcptStatus::Pending,
            })
            .collect(),
        received_at: chrono::Utc::now().timestamp(),
        size: 0,
        smtputf8: notice.smtputf8,
        body_type: notice.eight_bit.then(|| "8BITMIME".to_string()),
        ret: None,
        envid: None,
        client_ip: String::new(),
        helo: runtime.hostname.clone(),
        auth_user: None,
    };
    let mut draft = context.spool.draft();
    draft
        .write(&notice.message)
        .await
        .map_err(|e| e.to_string())?;
    let work = Work::of(&envelope);
    let id = context
        .spool
        .commit(envelope, draft)
        .await
        .map_err(|e| e.to_string())?;
    context.queue.notify(id, work);
    Ok(id)
}

fn was_delay_notified(envelope: &Envelope, rcpt: usize) -> bool {
    matches!(
        envelope.recipients.get(rcpt).map(|r| &r.status),
        Some(RcptStatus::Deferred {
            delay_notified: true,
            ..
        })
    )
}

/// A recipient given up on: a permanent failure whose reply says why, with
/// the last temporary reply (RFC 3463 4.4.7: delivery time expired).
fn expired_status(last_reply: &str, attempts: u32, now: Millis) -> RcptStatus {
    let mut reply = format!("550 5.4.7 delivery time expired after {attempts} attempt(s)");
    if !last_reply.is_empty() {
        reply.push_str("; last reply: ");
        reply.push_str(last_reply);
    }
    RcptStatus::Failed {
        reply,
        at: seconds(now),
    }
}

/// Writes `changes` for `msg`: only `DONE` when they leave every recipient
/// final (one record instead of two), else a `STATE` record, after which the
/// message is finished if another task's record completed it meanwhile.
async fn record(context: &AttemptContext, msg: MsgId, changes: Vec<(usize, RcptStatus)>) {
    let spool = &context.spool;
    let Some(mut current) = spool.get(msg) else {
        // Deleted by the administrator, or finished: nothing to record.
        return;
    };
    for (i, status) in &changes {
        if let Some(r) = current.recipients.get_mut(*i) {
            r.status = status.clone();
        }
    }
    if current.all_final() {
        finish(context, msg).await;
        return;
    }
    let recorded = spool
        .record_many(vec![Outcome::State(msg, changes)])
        .await
        .pop()
        .unwrap_or(Err(SpoolError::Closed));
    match recorded {
        Ok(()) => {
            if spool.get(msg).is_some_and(|env| env.all_final()) {
                finish(context, msg).await;
            }
        }
        Err(SpoolError::NotFound(_)) => {}
        Err(e) => warn!(event = "queue.record_failed", queue_id = %msg, error = %e),
    }
}

/// Finishes `msg` (its DONE record) together with the others finished
/// within [`DONE_LINGER`]: one group commit for them all. The first task to
/// add one to an empty batch waits the linger and commits the batch; the
/// others only add theirs. A DONE lost in a crash costs a duplicate
/// delivery, never a message, so it need not be synced at once: at 100 KiB
/// a DONE per commit was most of the relay's flushes.
async fn finish(context: &AttemptContext, msg: MsgId) {
    let first = {
        let mut batch = context.done_batch.lock().unwrap_or_else(|p| p.into_inner());
        batch.push(msg);
        batch.len() == 1
    };
    if !first {
        return;
    }
    tokio::time::sleep(DONE_LINGER).await;
    let batch = std::mem::take(&mut *context.done_batch.lock().unwrap_or_else(|p| p.into_inner()));
    let outcomes = batch.iter().map(|id| Outcome::Done(*id)).collect();
    let results = context.spool.record_many(outcomes).await;
    for (msg, result) in batch.into_iter().zip(results) {
        match result {
            Ok(()) => info!(event = "queue.done", queue_id = %msg),
            // Another task finished it first.
            Err(SpoolError::NotFound(_)) => {}
            Err(e) => warn!(event = "queue.finish_failed", queue_id = %msg, error = %e),
        }
    }
}

/// How long a finished message's DONE record waits for others to share its
/// group commit.
const DONE_LINGER: std::time::Duration = std::time::Duration::from_millis(20);
