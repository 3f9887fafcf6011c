//! The administrator's view of the queue and their commands on it, answered
//! by the manager (which owns the scheduler): where every message is, why
//! each recipient waits, per-destination state; flush, hold, release,
//! delete.
//!
//! Invariants: answers are JSON values in the shapes `tern queue` renders
//! (times in unix seconds); holds survive a restart (kept in
//! `<data_dir>/held`, rewritten whole on every change, one queue ID a line;
//! a user's mail held by the circuit breaker is held again at start from the
//! users file's mark, so `tern user release` on a stopped server suffices);
//! a deleted message is finished in the spool without a bounce, like
//! Postfix's `postsuper -d`.
//!
//! Errors: an unknown or finished message is `{"affected": 0}` for the
//! commands and an error for `show`; a failure to write the hold list or the
//! spool is an error reply (the in-memory change stands for this run).

use super::{Manager, seconds};
use crate::scheduler::{DestinationSummary, Millis, RcptExplain, Wait};
use crate::spool::{Envelope, MsgId, Route};
use serde_json::{Value, json};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use tracing::{info, warn};

/// One command from `tern queue`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueOp {
    List,
    Show(MsgId),
    Flush(Option<MsgId>),
    Hold(MsgId),
    Release(MsgId),
    Delete(MsgId),
    Destinations,
    /// `tern user release`: the circuit breaker lets this user's mail go.
    ReleaseUser(String),
    /// A reloaded config: routes, outbound settings and retry policy for
    /// the attempts that start from now on (those in flight finish on the
    /// old ones). Refused, with the old config kept, when its resolver or
    /// TLS settings cannot be set up.
    Reconfigure(NewConfig),
    /// Pending recipients by state, for the metrics endpoint.
    Counts,
}

/// A reloaded config; two are equal when they are the same one.
#[derive(Debug, Clone)]
pub struct NewConfig(pub std::sync::Arc<crate::config::Runtime>);

impl PartialEq for NewConfig {
    fn eq(&self, other: &NewConfig) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for NewConfig {}

/// Where the hold list lives.
pub(super) fn held_path(data_dir: &Path) -> PathBuf {
    data_dir.join("held")
}

/// The held queue IDs recorded by an earlier run; unreadable lines are
/// skipped (the message then simply runs).
pub(super) fn load_held(path: &Path) -> BTreeSet<MsgId> {
    std::fs::read_to_string(path)
        .map(|text| text.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

fn save_held(path: &Path, held: &BTreeSet<MsgId>) -> std::io::Result<()> {
    let text: String = held.iter().map(|id| format!("{id}\n")).collect();
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)?;
    crate::fsutil::sync_dir(path.parent().unwrap_or(Path::new(".")))
}

impl Manager {
    pub(super) async fn queue_op(&mut self, op: QueueOp) -> Result<Value, String> {
        let now = super::now_millis();
        match op {
            QueueOp::List => {
                let messages: Vec<Value> = self
                    .spool
                    .live()
                    .iter()
                    .map(|(id, env)| self.message_json(*id, env, now, false))
                    .collect();
                Ok(json!({ "messages": messages }))
            }
            QueueOp::Show(id) => {
                let env = self
                    .spool
                    .get(id)
                    .ok_or_else(|| format!("no message {id} in the queue"))?;
                let m = self.message_json(id, &env, now, true);
                Ok(m)
            }
            QueueOp::Flush(None) => {
                self.scheduler.flush(now);
                info!(event = "queue.flush", messages = self.scheduler.pending());
                Ok(json!({ "affected": self.spool.live().len() }))
            }
            QueueOp::Flush(Some(id)) => {
                let affected = self.scheduler.flush_message(id, now);
                info!(event = "queue.flush", queue_id = %id, affected);
                Ok(json!({ "affected": usize::from(affected) }))
            }
            QueueOp::Hold(id) => {
                if self.spool.get(id).is_none() {
                    return Ok(json!({ "affected": 0 }));
                }
                self.scheduler.hold(id);
                self.held.insert(id);
                info!(event = "queue.hold", queue_id = %id);
                self.save_held()?;
                Ok(json!({ "affected": 1 }))
            }
            QueueOp::Release(id) => {
                let affected = self.held.remove(&id);
                self.scheduler.release(id, now);
                info!(event = "queue.release", queue_id = %id, affected);
                self.save_held()?;
                Ok(json!({ "affected": usize::from(affected) }))
            }
            QueueOp::Delete(id) => {
                if self.spool.get(id).is_none() {
                    return Ok(json!({ "affected": 0 }));
                }
                self.scheduler.delete(id);
                if self.held.remove(&id) {
                    self.save_held()?;
                }
                match self.spool.finish(id).await {
                    Ok(()) | Err(crate::spool::SpoolError::NotFound(_)) => {
                        warn!(event = "queue.delete", queue_id = %id, "deleted by the administrator, no bounce");
                        Ok(json!({ "affected": 1 }))
                    }
                    Err(e) => Err(format!("cannot delete {id}: {e}")),
                }
            }
            QueueOp::Reconfigure(NewConfig(runtime)) => {
                let context = super::AttemptContext::new(
                    runtime.clone(),
                    self.spool.clone(),
                    self.context.queue.clone(),
                )?;
                self.context = std::sync::Arc::new(context);
                self.scheduler.set_config(super::scheduler_config(&runtime));
                Ok(json!({ "affected": 0 }))
            }
            QueueOp::ReleaseUser(user) => {
                let was_held = self.egress.release(&user);
                let mut affected = 0;
                for (id, env) in self.spool.live() {
                    // A message the administrator held on its own stays held.
                    if submitted_by(&env, &user) && !self.held.contains(&id) {
                        affected += usize::from(self.scheduler.release(id, now));
                    }
                }
                info!(event = "egress.released", user = %user, was_held, messages = affected);
                Ok(json!({ "affected": affected, "was_held": was_held }))
            }
            QueueOp::Counts => {
                serde_json::to_value(self.scheduler.counts()).map_err(|e| e.to_string())
            }
            QueueOp::Destinations => {
                let list: Vec<Value> = self
                    .scheduler
                    .destinations(now)
                    .iter()
                    .map(destination_json)
                    .collect();
                Ok(json!({ "destinations": list }))
            }
        }
    }

    /// The circuit breaker tripped for `user`: every queued message they
    /// submitted stops (the users file's mark keeps it so across a restart).
    pub(super) fn hold_user(&mut self, user: &str) {
        let mut held = 0;
        for (id, env) in self.spool.live() {
            if submitted_by(&env, user) {
                held += usize::from(self.scheduler.hold(id));
            }
        }
        warn!(event = "queue.hold_user", user, messages = held);
    }

    fn save_held(&self) -> Result<(), String> {
        save_held(&self.held_path, &self.held)
            .map_err(|e| format!("cannot write {}: {e}", self.held_path.display()))
    }

    /// The spool's view of a message (`control::render::message_json`)
    /// with what only the running manager knows: each remote recipient's
    /// destination, attempts, last reply and who gave it, next attempt,
    /// give-up time and why it waits.
    fn message_json(&self, id: MsgId, env: &Envelope, now: Millis, details: bool) -> Value {
        let mut m = crate::control::render::message_json(id, env, details);
        m["held"] = json!(self.held.contains(&id) || self.user_held(env));
        let explained: HashMap<usize, RcptExplain> = self
            .scheduler
            .explain_message(id, now)
            .into_iter()
            .map(|e| (e.key.rcpt, e))
            .collect();
        let Some(rcpts) = m["recipients"].as_array_mut() else {
            return m;
        };
        for (i, (rcpt, r)) in rcpts.iter_mut().zip(&env.recipients).enumerate() {
            rcpt["destination"] = match &r.route {
                Route::Remote => json!(self.context.destination_of(&r.address).to_string()),
                Route::Local { mailbox } => json!(format!("maildir:{mailbox}")),
            };
            rcpt["answered_by"] = json!(self.answered_by.get(&(id, i)));
            if let Some(e) = explained.get(&i) {
                rcpt["destination"] = json!(e.destination.to_string());
                rcpt["attempts"] = json!(e.attempts);
                if e.last_reply.is_some() {
                    rcpt["last_reply"] = json!(e.last_reply);
                }
                rcpt["next_attempt_at"] = json!(seconds(e.due));
                rcpt["expires_at"] = json!(seconds(e.expires_at));
                rcpt["wait"] = wait_json(&e.wait, e.last_reply.as_deref());
            }
        }
        m
    }
}

/// Why a recipient waits. A backoff after a connection-level failure says
/// what failed, so "host unreachable" and "TLS required but not offered"
/// are told apart from an ordinary deferral.
fn wait_json(wait: &Wait, last_reply: Option<&str>) -> Value {
    match wait {
        Wait::Due => json!({ "reason": "due" }),
        Wait::Backoff { until } => {
            let reply = last_reply.unwrap_or("");
            let lower = reply.to_ascii_lowercase();
            let reason =
                if lower.contains("tls") && (lower.contains(" 4.7.") || lower.contains(" 5.7.")) {
                    "tls_required"
                } else if lower.contains("cannot connect")
                    || lower.contains(" 4.4.1 ")
                    || lower.contains(" 4.4.2 ")
                {
                    "unreachable"
                } else {
                    "backoff"
                };
            json!({ "reason": reason, "until": seconds(*until), "detail": reply })
        }
        Wait::WindowFull { in_flight, window } => {
            json!({ "reason": "window_full", "in_flight": in_flight, "window": window })
        }
        Wait::Throttled { until } => json!({ "reason": "throttled", "until": seconds(*until) }),
        Wait::DestinationDead { next_probe } => {
            json!({ "reason": "destination_dead", "until": seconds(*next_probe), "detail": last_reply })
        }
        Wait::Held => json!({ "reason": "held" }),
        Wait::InFlight => json!({ "reason": "in_flight" }),
        Wait::Busy { in_flight, limit } => {
            json!({ "reason": "busy", "in_flight": in_flight, "window": limit })
        }
    }
}

fn submitted_by(envelope: &Envelope, user: &str) -> bool {
    envelope
        .auth_user
        .as_deref()
        .is_some_and(|u| u.eq_ignore_ascii_case(user))
}

fn destination_json(d: &DestinationSummary) -> Value {
    json!({
        "destination": d.destination.to_string(),
        "queued": d.queued,
        "in_flight": d.in_flight,
        "window": d.window,
        "rate_per_minute": d.rate_per_minute,
        "next_start": d.next_start.map(seconds),
        "consecutive_failures": d.consecutive_failures,
        "next_probe": d.next_probe.map(seconds),
        "throttled": d.throttled,
        "last_error": d.last_error,
        "last_error_at": d.last_error_at.map(seconds),
        "last_success_at": d.last_success_at.map(seconds),
    })
}
