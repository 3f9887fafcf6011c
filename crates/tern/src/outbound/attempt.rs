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
use crate::config::Runtime;
use crate::deliver::smtp::{Feed, MessageReport, RecipientReport, SmtpSettings, deliver_from};
use crate::dns::Dns;
use crate::queue::QueueHandle;
use crate::route::{Delivery, RouteError, Router, RouterSettings};
use crate::scheduler::{self, Connection, Job, JobReport, RcptResult, ReplyClass, classify};
use crate::spool::{Envelope, Spool, domain_of};
use rand::SeedableRng;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use tern_proto::client::{Message, Recipient, Status};
use tern_proto::{
    ForwardPath, MailParams, RcptParams, Reply, ReversePath, parse_forward_path, parse_reverse_path,
};
use tokio::sync::{mpsc, oneshot};
use tracing::info;

/// What a connection task needs, shared by all of them.
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
    /// Messages finished, waiting to share one DONE commit (see `settle`).
    pub done_batch: std::sync::Mutex<Vec<crate::spool::MsgId>>,
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
            tls: o.tls,
            tls_ca_file: o.tls_ca_file.clone(),
            max_recipients: o.max_recipients_per_job,
            ..SmtpSettings::default()
        };
        let relayed = SmtpSettings {
            credentials: o.relay_credentials.clone(),
            auth_without_tls: o.relay_auth_without_tls,
            tls: o.relay_tls,
            ..direct.clone()
        };
        // A CA file that went bad since check-config shows at start-up.
        for settings in [&direct, &relayed] {
            settings
                .prepare_tls()
                .map_err(|e| format!("outbound TLS: {e}"))?;
        }
        Ok(AttemptContext {
            runtime,
            spool,
            queue,
            router,
            direct,
            relayed,
            done_batch: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// The scheduler's destination for a recipient address (no DNS).
    pub fn destination_of(&self, address: &str) -> scheduler::Destination {
        scheduler::Destination::new(self.router.destination(domain_of(address)).as_str())
    }

    /// The relay's TLS policy and credentials go to the relay host only:
    /// a per-domain SMTP transport is another server, and gets the
    /// direct settings like an MX host.
    fn settings_for(&self, domain: &str) -> &SmtpSettings {
        let routes = self.router.routes();
        if routes.transport(domain).is_none() && routes.relay.is_some() {
            &self.relayed
        } else {
            &self.direct
        }
    }

    /// Routes `job`'s destination afresh (a config or DNS change applies
    /// to queued mail).
    async fn route(
        &self,
        job: &Job,
        envelope: &Envelope,
    ) -> (String, Result<Delivery, RouteError>) {
        let domain = job
            .recipients
            .first()
            .and_then(|&i| envelope.recipients.get(i))
            .map(|r| domain_of(&r.address).to_string())
            .unwrap_or_default();
        // A Send RNG: this future moves between threads.
        let mut rng = rand::rngs::StdRng::from_rng(&mut rand::rng());
        let delivery = self.router.resolve(&domain, &mut rng).await;
        (domain, delivery)
    }
}

/// A job being carried: its message as sent and the recipients that could
/// not be (already decided).
struct Carried {
    job: Job,
    envelope: Envelope,
    /// The recipient indexes in the order of the message's recipients.
    sent: Vec<usize>,
    results: Vec<(usize, RcptResult)>,
    details: Vec<(usize, RcptDetail)>,
}

/// Feeds one connection: the job it was opened for, then the destination's
/// next jobs from the manager (connection reuse), each reported to the
/// manager as its outcome comes.
struct JobFeed {
    context: Arc<AttemptContext>,
    finished: mpsc::UnboundedSender<Finished>,
    /// Jobs to send before asking the manager for more.
    queued: VecDeque<(Job, Envelope)>,
    /// Ask the manager for the destination's next job after an outcome.
    reuse: bool,
    /// The manager's answer to the last report.
    next: Option<oneshot::Receiver<Option<(Job, Envelope)>>>,
    carried: HashMap<usize, Carried>,
    next_key: usize,
    /// Jobs no server took (every host failed before them).
    stranded: Vec<(Carried, MessageReport)>,
}

impl JobFeed {
    fn new(
        context: Arc<AttemptContext>,
        finished: mpsc::UnboundedSender<Finished>,
        queued: VecDeque<(Job, Envelope)>,
        reuse: bool,
    ) -> JobFeed {
        JobFeed {
            context,
            finished,
            queued,
            reuse,
            next: None,
            carried: HashMap::new(),
            next_key: 0,
            stranded: Vec::new(),
        }
    }

    /// Sends a job's outcome to the manager; with `ask`, also asks for the
    /// destination's next job (answered through `self.next`).
    fn report(&mut self, carried: Carried, report: JobReport, ask: bool) {
        let Carried {
            job,
            envelope,
            details,
            ..
        } = carried;
        let next = if ask {
            let (tx, rx) = oneshot::channel();
            self.next = Some(rx);
            Some(tx)
        } else {
            None
        };
        let _ = self.finished.send(Finished {
            job,
            envelope,
            report,
            details,
            next,
        });
    }

    /// Reports a carried job with the driver's outcome of its message.
    fn report_message(&mut self, mut carried: Carried, report: &MessageReport, ask: bool) {
        let connection = connection_of(report);
        for (&i, r) in carried.sent.iter().zip(&report.recipients) {
            let (result, detail) = recipient_result(r);
            carried.results.push((i, result));
            carried.details.push((i, detail));
        }
        let recipients = std::mem::take(&mut carried.results);
        self.report(
            carried,
            JobReport {
                connection,
                recipients,
            },
            ask,
        );
    }

    /// The message for `job`, or its outcome at once when there is nothing
    /// to send (the body is unreadable, no recipient can be written).
    async fn prepare(&mut self, job: Job, envelope: Envelope) -> Option<(usize, Message)> {
        let body = match self.context.spool.read_body(job.msg).await {
            Ok(body) => body,
            Err(e) => {
                let reply = Reply::enhanced(
                    451,
                    (4, 3, 0),
                    format!("message unreadable in the spool: {e}"),
                );
                let (report, details) = all_recipients(&job, &reply, ReplyClass::TempFail, None);
                let carried = Carried {
                    job,
                    envelope,
                    sent: Vec::new(),
                    results: Vec::new(),
                    details,
                };
                let ask = self.reuse;
                self.report(carried, report, ask);
                return None;
            }
        };
        let (message, sent, unsendable) = message_for(&job, &envelope, body);
        let mut carried = Carried {
            job,
            envelope,
            sent,
            results: Vec::new(),
            details: Vec::new(),
        };
        for i in unsendable {
            let reply = one_line(&Reply::enhanced(
                553,
                (5, 1, 3),
                "address unusable for delivery",
            ));
            carried.results.push((
                i,
                RcptResult::Failed {
                    reply: reply.clone(),
                },
            ));
            carried.details.push((
                i,
                RcptDetail {
                    reply,
                    answered_by: None,
                },
            ));
        }
        if carried.sent.is_empty() {
            let report = established(std::mem::take(&mut carried.results));
            let ask = self.reuse;
            self.report(carried, report, ask);
            return None;
        }
        let key = self.next_key;
        self.next_key += 1;
        self.carried.insert(key, carried);
        Some((key, message))
    }
}

impl Feed for JobFeed {
    async fn next(&mut self) -> Option<(usize, Message)> {
        loop {
            let (job, envelope) = match self.queued.pop_front() {
                Some(queued) => queued,
                None => match self.next.take()?.await {
                    Ok(Some(next)) => next,
                    _ => return None,
                },
            };
            if let Some(message) = self.prepare(job, envelope).await {
                return Some(message);
            }
            if self.queued.is_empty() && self.next.is_none() {
                return None;
            }
        }
    }

    fn outcome(&mut self, key: usize, report: MessageReport) {
        let Some(carried) = self.carried.remove(&key) else {
            return;
        };
        if report.recipients.iter().all(|r| r.answered_by.is_none()) {
            // The fallback relay may still take it.
            self.stranded.push((carried, report));
            return;
        }
        let ask = self.reuse;
        self.report_message(carried, &report, ask);
    }
}

fn recipient_result(r: &RecipientReport) -> (RcptResult, RcptDetail) {
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
    let detail = RcptDetail {
        reply,
        answered_by: r.answered_by.as_ref().map(|p| p.to_string()),
    };
    (result, detail)
}

/// A connection task: routes `job`'s destination, carries the job and then
/// the destination's next ones while the manager has them; jobs no server
/// took go to the fallback relay when one is configured.
pub(crate) async fn connection(
    context: Arc<AttemptContext>,
    job: Job,
    envelope: Envelope,
    finished: mpsc::UnboundedSender<Finished>,
) {
    let (domain, delivery) = context.route(&job, &envelope).await;
    let delivery = match delivery {
        Ok(delivery) => delivery,
        Err(e) => {
            let (report, details) = route_failure(&job, &e);
            let _ = finished.send(Finished {
                job,
                envelope,
                report,
                details,
                next: None,
            });
            return;
        }
    };
    let mut queued = VecDeque::from([(job, envelope)]);
    loop {
        let mut feed = JobFeed::new(context.clone(), finished.clone(), queued, true);
        deliver_from(&delivery, &mut feed, context.settings_for(&domain)).await;
        let stranded = std::mem::take(&mut feed.stranded);
        let stranded = try_fallback(&context, &domain, &delivery, &finished, stranded).await;
        // What no server took is reported last, with the last connection
        // failure: the destination's dead-detection counts it.
        for (carried, report) in stranded {
            feed.report_message(carried, &report, false);
        }
        // The manager may have handed over a job after the last outcome
        // that the connection, lost since, never asked for: it is this
        // task's (in flight for the scheduler) and goes on a new connection.
        let Some(next) = feed.next.take() else {
            return;
        };
        match next.await {
            Ok(Some(job)) => queued = VecDeque::from([job]),
            _ => return,
        }
    }
}

/// Jobs no server took go to the fallback relay, when one is configured;
/// returns those it did not take either.
async fn try_fallback(
    context: &Arc<AttemptContext>,
    domain: &str,
    delivery: &Delivery,
    finished: &mpsc::UnboundedSender<Finished>,
    stranded: Vec<(Carried, MessageReport)>,
) -> Vec<(Carried, MessageReport)> {
    if stranded.is_empty() {
        return stranded;
    }
    let mut rng = rand::rngs::StdRng::from_rng(&mut rand::rng());
    let Some(Ok(fallback)) = context.router.resolve_fallback(domain, &mut rng).await else {
        return stranded;
    };
    info!(event = "delivery.fallback_relay", destination = %delivery.destination, relay = %fallback.destination, messages = stranded.len());
    let queued = stranded
        .into_iter()
        .map(|(carried, _)| (carried.job, carried.envelope))
        .collect();
    let mut feed = JobFeed::new(context.clone(), finished.clone(), queued, false);
    deliver_from(&fallback, &mut feed, &context.relayed).await;
    feed.stranded
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
    (established(results), details)
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
        return all_recipients(job, &reply, ReplyClass::PermFail, None);
    }
    let (mut report, details) = all_recipients(job, &reply, ReplyClass::ConnectFail, None);
    report.connection = Connection::Failed {
        reason: one_line(&reply),
    };
    (report, details)
}

/// How the destination behaved, for its window and dead state: a message
/// some server took means a working destination; else the last connection
/// failure says whether it throttled us or could not be reached.
fn connection_of(report: &MessageReport) -> Connection {
    let Some(r) = report.recipients.first() else {
        return Connection::Established;
    };
    if report.recipients.iter().any(|r| r.answered_by.is_some()) {
        return Connection::Established;
    }
    let line = one_line(&r.reply);
    let text = r.reply.lines.join(" ");
    if !r.local && classify(r.reply.code, r.reply.enhanced, &text) == ReplyClass::Throttled {
        Connection::Throttled { reply: line }
    } else {
        Connection::Failed { reason: line }
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
