//! One connection task: routes a job's destination, delivers the job's
//! message with the SMTP/LMTP driver, reports the outcome to the manager and
//! carries the destination's next job while the manager has one.
//!
//! Invariants: every recipient of a job gets exactly one result in the
//! [`JobReport`] and one [`RcptDetail`]; a reply stored or logged is the
//! driver's sanitised one, on one line.
//!
//! Errors: none returned; a route, spool or address problem is each
//! recipient's result (temporary unless the route says the domain cannot
//! receive mail).

use super::NextJob;
use crate::config::{Runtime, TlsChoice};
use crate::deliver::smtp::{self, AttemptReport, SmtpSettings};
use crate::dns::Dns;
use crate::queue::QueueHandle;
use crate::route::{Delivery, RouteError, Router, RouterSettings};
use crate::scheduler::{self, Connection, Job, JobReport, RcptResult, ReplyClass, classify};
use crate::spool::{Envelope, Spool};
use rand::SeedableRng;
use std::sync::Arc;
use tern_proto::client::{Message, Recipient, Status, TlsPolicy};
use tern_proto::{
    ForwardPath, MailParams, RcptParams, Reply, ReversePath, parse_forward_path, parse_reverse_path,
};
use tokio::sync::{mpsc, oneshot};
use tracing::info;

/// What a connection task needs, shared by all of them.
#[allow(dead_code)] // runtime and queue: for bounces, which come next
pub(crate) struct AttemptContext {
    pub runtime: Arc<Runtime>,
    pub spool: Spool,
    pub queue: QueueHandle,
    router: Router,
    /// For MX deliveries and per-domain transports.
    direct: SmtpSettings,
    /// For the relay host and the fallback relay (their TLS policy and
    /// credentials).
    relayed: SmtpSettings,
}

/// One recipient's outcome as `tern queue` and bounces show it.
#[derive(Debug, Clone)]
pub(crate) struct RcptDetail {
    /// The reply on one line: `451 4.7.1 try later`.
    pub reply: String,
    /// The server that gave it (`mx.example.org[192.0.2.1]:25`), when one did.
    pub answered_by: Option<String>,
}

/// A job's outcome, sent to the manager.
pub(crate) struct Finished {
    pub job: Job,
    pub envelope: Envelope,
    pub report: JobReport,
    /// By recipient index, for every recipient of the job.
    pub details: Vec<(usize, RcptDetail)>,
    /// Where the manager sends the destination's next job; `None` when the
    /// connection cannot take one.
    pub next: Option<NextJob>,
}

fn tls_policy(choice: TlsChoice) -> TlsPolicy {
    match choice {
        TlsChoice::None => TlsPolicy::None,
        TlsChoice::Opportunistic => TlsPolicy::Opportunistic,
        TlsChoice::Require | TlsChoice::Verify => TlsPolicy::Require,
    }
}

impl AttemptContext {
    pub fn new(runtime: Arc<Runtime>, spool: Spool, queue: QueueHandle) -> Result<Self, String> {
        let o = &runtime.outbound;
        let dns = Dns::new(&o.dns)?;
        let router = Router::new(
            dns,
            o.routes.clone(),
            RouterSettings {
                hostname: runtime.hostname.clone(),
                families: o.families,
                mx_port: o.mx_port,
            },
        );
        let direct = SmtpSettings {
            helo_name: runtime.hostname.clone(),
            connect_timeout: o.connect_timeout,
            max_messages_per_connection: o.max_messages_per_connection,
            credentials: None,
            auth_without_tls: false,
            tls: tls_policy(o.tls),
            max_recipients: o.max_recipients_per_job,
            ..SmtpSettings::default()
        };
        let relayed = SmtpSettings {
            credentials: o.relay_credentials.clone(),
            auth_without_tls: o.relay_auth_without_tls,
            tls: tls_policy(o.relay_tls),
            ..direct.clone()
        };
        Ok(AttemptContext {
            runtime,
            spool,
            queue,
            router,
            direct,
            relayed,
        })
    }

    /// The scheduler's destination for a recipient address (no DNS).
    pub fn destination_of(&self, address: &str) -> scheduler::Destination {
        scheduler::Destination::new(self.router.destination(domain_of(address)).as_str())
    }

    fn settings_for(&self, delivery: &Delivery) -> &SmtpSettings {
        let relay = delivery.destination.as_str().starts_with("relay:");
        if relay { &self.relayed } else { &self.direct }
    }

    /// One delivery attempt of `job`'s message.
    async fn attempt(
        &self,
        job: &Job,
        envelope: &Envelope,
    ) -> (JobReport, Vec<(usize, RcptDetail)>) {
        let Some(&first) = job.recipients.first() else {
            return (established(Vec::new()), Vec::new());
        };
        let domain = envelope
            .recipients
            .get(first)
            .map(|r| domain_of(&r.address))
            .unwrap_or("");
        // A Send RNG: this future moves between threads.
        let mut rng = rand::rngs::StdRng::from_rng(&mut rand::rng());
        let delivery = match self.router.resolve(domain, &mut rng).await {
            Ok(delivery) => delivery,
            Err(e) => return route_failure(job, &e),
        };
        let body = match self.spool.read_body(job.msg).await {
            Ok(body) => body,
            Err(e) => {
                let reply = Reply::enhanced(
                    451,
                    (4, 3, 0),
                    format!("message unreadable in the spool: {e}"),
                );
                return all_recipients(job, established, &reply, ReplyClass::TempFail, None);
            }
        };
        let (message, sent, unsendable) = message_for(job, envelope, body);
        let mut details = Vec::with_capacity(job.recipients.len());
        let mut results = Vec::with_capacity(job.recipients.len());
        for i in unsendable {
            let reply = Reply::enhanced(553, (5, 1, 3), "address unusable for delivery");
            results.push((
                i,
                RcptResult::Failed {
                    reply: one_line(&reply),
                },
            ));
            details.push((
                i,
                RcptDetail {
                    reply: one_line(&reply),
                    answered_by: None,
                },
            ));
        }
        if sent.is_empty() {
            return (established(results), details);
        }
        let messages = [message];
        let mut report = smtp::deliver(&delivery, &messages, self.settings_for(&delivery)).await;
        if never_taken(&report)
            && let Some(Ok(fallback)) = self.router.resolve_fallback(domain, &mut rng).await
        {
            info!(event = "delivery.fallback_relay", queue_id = %job.msg, destination = %job.destination, relay = %fallback.destination);
            report = smtp::deliver(&fallback, &messages, &self.relayed).await;
        }
        let connection = connection_of(&report);
        if let Some(message) = report.messages.first() {
            for (&i, r) in sent.iter().zip(&message.recipients) {
                let reply = one_line(&r.reply);
                let result = match r.status {
                    Status::Delivered => RcptResult::Delivered,
                    Status::Permanent => RcptResult::Failed {
                        reply: reply.clone(),
                    },
                    Status::Temporary => RcptResult::Deferred {
                        class: if r.answered_by.is_none() && r.local {
                            ReplyClass::ConnectFail
                        } else {
                            classify(r.reply.code, r.reply.enhanced, &r.reply.lines.join(" "))
                        },
                        reply: reply.clone(),
                    },
                };
                results.push((i, result));
                details.push((
                    i,
                    RcptDetail {
                        reply,
                        answered_by: r.answered_by.as_ref().map(|p| p.to_string()),
                    },
                ));
            }
        }
        (
            JobReport {
                connection,
                recipients: results,
            },
            details,
        )
    }
}

/// Carries `job`, then the destination's next jobs while the manager has
/// them for this connection.
pub(crate) async fn connection(
    context: Arc<AttemptContext>,
    mut job: Job,
    mut envelope: Envelope,
    finished: mpsc::UnboundedSender<Finished>,
) {
    loop {
        let (report, details) = context.attempt(&job, &envelope).await;
        let (next, reply) = oneshot::channel();
        let done = Finished {
            job,
            envelope,
            report,
            details,
            next: Some(next),
        };
        if finished.send(done).is_err() {
            return;
        }
        match reply.await {
            Ok(Some((j, e))) => (job, envelope) = (j, e),
            _ => return,
        }
    }
}

fn domain_of(address: &str) -> &str {
    address.rsplit_once('@').map_or(address, |(_, d)| d)
}

/// A reply as stored in the spool and shown by `tern queue`: one line.
pub(crate) fn one_line(reply: &Reply) -> String {
    let mut line = reply.code.to_string();
    if let Some(e) = reply.enhanced {
        line.push(' ');
        line.push_str(&e.to_string());
    }
    for text in &reply.lines {
        line.push(' ');
        line.push_str(text);
    }
    line
}

fn established(recipients: Vec<(usize, RcptResult)>) -> JobReport {
    JobReport {
        connection: Connection::Established,
        recipients,
    }
}

/// Every recipient of `job` with the same reply.
fn all_recipients(
    job: &Job,
    report: fn(Vec<(usize, RcptResult)>) -> JobReport,
    reply: &Reply,
    class: ReplyClass,
    answered_by: Option<String>,
) -> (JobReport, Vec<(usize, RcptDetail)>) {
    let line = one_line(reply);
    let result = match class {
        ReplyClass::PermFail => RcptResult::Failed {
            reply: line.clone(),
        },
        ReplyClass::Success => RcptResult::Delivered,
        class => RcptResult::Deferred {
            class,
            reply: line.clone(),
        },
    };
    let results = job
        .recipients
        .iter()
        .map(|&i| (i, result.clone()))
        .collect();
    let details = job
        .recipients
        .iter()
        .map(|&i| {
            (
                i,
                RcptDetail {
                    reply: line.clone(),
                    answered_by: answered_by.clone(),
                },
            )
        })
        .collect();
    (report(results), details)
}

/// A route that cannot be used: the domain cannot receive mail (permanent:
/// NXDOMAIN, null MX) or DNS or the route failed for now, which counts
/// against the destination like a refused connection.
fn route_failure(job: &Job, e: &RouteError) -> (JobReport, Vec<(usize, RcptDetail)>) {
    let permanent = e.is_permanent();
    let code = if permanent { 550 } else { 451 };
    let enhanced = tern_proto::EnhancedCode::parse(e.enhanced_code());
    let reply = tern_proto::client::sanitize(&Reply::new(code, enhanced, e.to_string()));
    if permanent {
        return all_recipients(job, established, &reply, ReplyClass::PermFail, None);
    }
    let (mut report, details) =
        all_recipients(job, established, &reply, ReplyClass::ConnectFail, None);
    report.connection = Connection::Failed {
        reason: one_line(&reply),
    };
    (report, details)
}

/// No server took the message: every connection failed before it.
fn never_taken(report: &AttemptReport) -> bool {
    report
        .messages
        .iter()
        .all(|m| m.recipients.iter().all(|r| r.answered_by.is_none()))
}

/// How the destination behaved, for its window and dead state.
fn connection_of(report: &AttemptReport) -> Connection {
    if !never_taken(report) {
        return Connection::Established;
    }
    match report.connections.last().and_then(|c| c.failure.as_ref()) {
        Some(f) if !f.local => {
            let reply = &f.reply;
            let line = one_line(reply);
            if classify(reply.code, reply.enhanced, &reply.lines.join(" ")) == ReplyClass::Throttled
            {
                Connection::Throttled { reply: line }
            } else {
                Connection::Failed { reason: line }
            }
        }
        Some(f) => Connection::Failed {
            reason: one_line(&f.reply),
        },
        None => Connection::Failed {
            reason: "no host to deliver to".into(),
        },
    }
}

/// The client's message for `job`: the envelope's sender and parameters, the
/// job's recipients with their DSN parameters. Returns the message, the
/// recipient indexes it carries (in its order) and those that cannot be
/// written as an SMTP address.
fn message_for(job: &Job, envelope: &Envelope, body: Vec<u8>) -> (Message, Vec<usize>, Vec<usize>) {
    let from = match envelope.sender.as_str() {
        "" => ReversePath::Null,
        sender => parse_reverse_path(&format!("<{sender}>"))
            .map(|(p, _)| p)
            // The session parsed it at MAIL; a stored sender that no longer
            // parses is ours to fix, and the null path cannot cause a loop.
            .unwrap_or(ReversePath::Null),
    };
    let mut words: Vec<String> = Vec::new();
    if let Some(body) = &envelope.body_type {
        words.push(format!("BODY={body}"));
    }
    if envelope.smtputf8 {
        words.push("SMTPUTF8".into());
    }
    if let Some(ret) = &envelope.ret {
        words.push(format!("RET={ret}"));
    }
    if let Some(envid) = &envelope.envid {
        words.push(format!(
            "ENVID={}",
            tern_proto::command::xtext_encode(envid)
        ));
    }
    let words_ref: Vec<&str> = words.iter().map(String::as_str).collect();
    let params = MailParams::parse(&words_ref).unwrap_or_default();
    let mut recipients = Vec::new();
    let (mut sent, mut unsendable) = (Vec::new(), Vec::new());
    for &i in &job.recipients {
        let Some(r) = envelope.recipients.get(i) else {
            continue;
        };
        let to = match parse_forward_path(&format!("<{}>", r.address)) {
            Ok((ForwardPath::Mailbox(m), _)) => ForwardPath::Mailbox(m),
            _ => {
                unsendable.push(i);
                continue;
            }
        };
        let mut words = Vec::new();
        if let Some(notify) = &r.notify {
            words.push(format!("NOTIFY={notify}"));
        }
        if let Some((kind, address)) = r.orcpt.as_deref().and_then(|o| o.split_once(';')) {
            words.push(format!(
                "ORCPT={kind};{}",
                tern_proto::command::xtext_encode(address)
            ));
        }
        let words_ref: Vec<&str> = words.iter().map(String::as_str).collect();
        recipients.push(Recipient {
            to,
            params: RcptParams::parse(&words_ref).unwrap_or_default(),
        });
        sent.push(i);
    }
    let message = Message {
        from,
        params,
        recipients,
        content: body.into(),
    };
    (message, sent, unsendable)
}
