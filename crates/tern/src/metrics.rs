//! Prometheus metrics: what the server counts as it works, and the HTTP
//! endpoint (`[metrics] address`, `GET /metrics`) that serves them in the
//! Prometheus text format (version 0.0.4).
//!
//! Invariants:
//! - The hot path (accepting connections, reading input, committing and
//!   delivering messages) only touches atomics: every counter a session or
//!   delivery updates is resolved once, at start, into a handle of its own;
//!   only refusals (not the hot path) look a label up in a `Family`.
//! - Every series exists from the start (at 0), so `rate()` and alerts see
//!   the first refusal of a kind as an increase, not as a new series.
//! - One name per refusal reason ([`Refusal::name`], with the content rules'
//!   names from `tern_proto::data::ContentError::name`): the log line and
//!   the counter use the same one.
//! - Values the server already keeps elsewhere (fsyncs in the spool, queue
//!   sizes in the outbound scheduler) are read at scrape time, not copied
//!   on every change.
//! - The endpoint answers each scrape on a task of its own, with a deadline
//!   for the whole exchange and a cap on open connections, so a slow or
//!   greedy scraper never holds anything mail needs.
//!
//! Errors: a metrics address that cannot be bound is a start-up error
//! naming `metrics.address`; a scrape whose queue question goes unanswered
//! in time is served without the queue gauges.

use crate::config::Role;
use crate::outbound::{AdminHandle, QueueOp};
use crate::spool::{MsgId, Spool, SpoolError};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};
use std::time::Duration;
use tern_proto::data::ContentError;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Metric names start with this (`tern_...`).
const PREFIX: &str = "tern";

/// The path that serves the metrics; any other gets 404.
pub const PATH: &str = "/metrics";

/// A scrape's whole exchange, from accept to the last byte written: a
/// client that trickles its request or stops reading is cut off then.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);

/// Time for the request head to arrive.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a scrape waits for the outbound manager's queue sizes.
const QUEUE_ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// Scrapes served at once; connections past it are closed at once (a
/// Prometheus server scrapes one at a time; a flood must not cost fds).
const MAX_SCRAPES: usize = 16;

type Labels = [(&'static str, &'static str); 1];
type Labels2 = [(&'static str, &'static str); 2];

/// Why a message was not accepted: the reason named in the log
/// (`event="message.refused"`) and the label of
/// `tern_messages_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The content broke a rule (bare LF, too large, line too long, NUL,
    /// too many `Received:` fields).
    Content(ContentError),
    /// The spool's file system is full (or the free-space reserve is
    /// reached, or a file-size or quota limit hit): 452 4.3.1.
    StorageFull,
    /// The spool could not store it for another reason: 451/452.
    StorageError,
    /// A policy hook refused it (sender not the user's, a held user...).
    Policy,
    /// The client closed the connection (or it broke) before the end.
    ClientGone,
    /// The client was silent longer than the timeout.
    Timeout,
    /// The server was stopping.
    Shutdown,
    /// The session dropped it otherwise: RSET between BDAT chunks, a
    /// session closed for its errors.
    Aborted,
}

impl Refusal {
    const OTHERS: [Refusal; 7] = [
        Refusal::StorageFull,
        Refusal::StorageError,
        Refusal::Policy,
        Refusal::ClientGone,
        Refusal::Timeout,
        Refusal::Shutdown,
        Refusal::Aborted,
    ];

    /// Every reason, for series that start at 0.
    pub fn all() -> impl Iterator<Item = Refusal> {
        ContentError::ALL
            .into_iter()
            .map(Refusal::Content)
            .chain(Refusal::OTHERS)
    }

    pub fn name(self) -> &'static str {
        match self {
            Refusal::Content(e) => e.name(),
            Refusal::StorageFull => "storage_full",
            Refusal::StorageError => "storage_error",
            Refusal::Policy => "policy",
            Refusal::ClientGone => "client_gone",
            Refusal::Timeout => "timeout",
            Refusal::Shutdown => "shutdown",
            Refusal::Aborted => "aborted",
        }
    }

    /// A storage failure: full (no space, quota, file size limit) or not.
    pub fn storage(e: &io::Error) -> Refusal {
        match e.kind() {
            io::ErrorKind::StorageFull
            | io::ErrorKind::QuotaExceeded
            | io::ErrorKind::FileTooLarge => Refusal::StorageFull,
            _ => Refusal::StorageError,
        }
    }

    /// As [`Refusal::storage`], for a spool error.
    pub fn spool(e: &SpoolError) -> Refusal {
        match e {
            SpoolError::Io(e) => Refusal::storage(e),
            _ => Refusal::StorageError,
        }
    }
}

/// Where a delivery attempt went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryClass {
    /// A local Maildir.
    Maildir,
    /// An LMTP transport (`route.transports`).
    Lmtp,
    /// The recipient domain's MX hosts.
    Mx,
    /// A relay: the smarthost, or a per-domain SMTP transport.
    Relay,
}

impl DeliveryClass {
    const ALL: [DeliveryClass; 4] = [
        DeliveryClass::Maildir,
        DeliveryClass::Lmtp,
        DeliveryClass::Mx,
        DeliveryClass::Relay,
    ];

    fn name(self) -> &'static str {
        match self {
            DeliveryClass::Maildir => "maildir",
            DeliveryClass::Lmtp => "lmtp",
            DeliveryClass::Mx => "mx",
            DeliveryClass::Relay => "relay",
        }
    }

    /// The class of an outbound destination (`mx:`, `relay:` or `lmtp:`
    /// followed by the domain or hops, as `route::Destination` names them).
    pub fn of_destination(destination: &str) -> DeliveryClass {
        match destination.split_once(':').map(|(kind, _)| kind) {
            Some("lmtp") => DeliveryClass::Lmtp,
            Some("relay") => DeliveryClass::Relay,
            _ => DeliveryClass::Mx,
        }
    }
}

/// What became of one recipient's delivery attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryOutcome {
    Delivered,
    Deferred,
    /// Bounced: refused for good, or given up on.
    Failed,
}

impl DeliveryOutcome {
    const ALL: [DeliveryOutcome; 3] = [
        DeliveryOutcome::Delivered,
        DeliveryOutcome::Deferred,
        DeliveryOutcome::Failed,
    ];

    fn name(self) -> &'static str {
        match self {
            DeliveryOutcome::Delivered => "delivered",
            DeliveryOutcome::Deferred => "deferred",
            DeliveryOutcome::Failed => "failed",
        }
    }
}

/// The process's metrics (one server per process).
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The counters the server updates, each resolved to its own handle.
pub struct Metrics {
    registry: Registry,
    /// By `Role::NAMES` index.
    connections_accepted: [Counter; 3],
    connections_refused: [Counter; 3],
    sessions_open: Gauge,
    received_bytes: Counter,
    messages_accepted: Counter,
    messages_refused: Family<Labels, Counter>,
    recipients_refused: Counter,
    commit_seconds: Histogram,
    commit_records: Histogram,
    /// By `DeliveryClass::ALL` index, then `DeliveryOutcome::ALL` index.
    deliveries: [[Counter; 3]; 4],
    logins_succeeded: Counter,
    logins_failed: Counter,
}

/// The position of `role` in `Role::NAMES`.
fn role_index(role: Role) -> usize {
    Role::NAMES
        .iter()
        .position(|(_, r)| *r == role)
        .unwrap_or(0)
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix(PREFIX);
        let by_role = |registry: &mut Registry, name: &str, help: &str| {
            let family = Family::<Labels, Counter>::default();
            registry.register(name, help, family.clone());
            Role::NAMES.map(|(role, _)| family.get_or_create_owned(&[("role", role)]))
        };
        let connections_accepted = by_role(
            &mut registry,
            "connections_accepted",
            "Connections accepted, by listener role",
        );
        let connections_refused = by_role(
            &mut registry,
            "connections_refused",
            "Connections refused with 421 for a connection limit, by listener role",
        );
        let sessions_open = Gauge::default();
        registry.register(
            "sessions_open",
            "SMTP sessions open now",
            sessions_open.clone(),
        );
        let received_bytes = Counter::default();
        registry.register_with_unit(
            "received",
            "Octets read from SMTP clients (after TLS decryption)",
            Unit::Bytes,
            received_bytes.clone(),
        );
        let messages_accepted = Counter::default();
        registry.register(
            "messages_accepted",
            "Messages accepted (250 after the spool commit)",
            messages_accepted.clone(),
        );
        let messages_refused = Family::<Labels, Counter>::default();
        registry.register(
            "messages_refused",
            "Messages refused or aborted, by reason",
            messages_refused.clone(),
        );
        for reason in Refusal::all() {
            let _ = messages_refused.get_or_create(&[("reason", reason.name())]);
        }
        let recipients_refused = Counter::default();
        registry.register(
            "recipients_refused",
            "RCPT commands refused by policy (unknown user, relay denied, limits)",
            recipients_refused.clone(),
        );
        // 100 µs to ~3.3 s: a group commit on a fast disk, up to a stalled one.
        let commit_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        registry.register_with_unit(
            "spool_commit_duration",
            "Time to write and sync one spool batch",
            Unit::Seconds,
            commit_seconds.clone(),
        );
        let commit_records = Histogram::new(exponential_buckets(1.0, 2.0, 10));
        registry.register(
            "spool_commit_records",
            "Records (messages, outcomes) written by one spool batch under one sync",
            commit_records.clone(),
        );
        let family = Family::<Labels2, Counter>::default();
        registry.register(
            "delivery_attempts",
            "Delivery attempts per recipient, by outcome and destination class",
            family.clone(),
        );
        let deliveries = DeliveryClass::ALL.map(|class| {
            DeliveryOutcome::ALL.map(|outcome| {
                family.get_or_create_owned(&[
                    ("destination", class.name()),
                    ("outcome", outcome.name()),
                ])
            })
        });
        let logins = Family::<Labels, Counter>::default();
        registry.register(
            "logins",
            "SMTP AUTH exchanges that ended, by outcome",
            logins.clone(),
        );
        let logins_succeeded = logins.get_or_create_owned(&[("outcome", "success")]);
        let logins_failed = logins.get_or_create_owned(&[("outcome", "failure")]);
        Metrics {
            registry,
            connections_accepted,
            connections_refused,
            sessions_open,
            received_bytes,
            messages_accepted,
            messages_refused,
            recipients_refused,
            commit_seconds,
            commit_records,
            deliveries,
            logins_succeeded,
            logins_failed,
        }
    }
}

pub fn connection_accepted(role: Role) {
    METRICS.connections_accepted[role_index(role)].inc();
}

pub fn connection_refused(role: Role) {
    METRICS.connections_refused[role_index(role)].inc();
}

/// Counts a session as open until dropped.
pub struct OpenSession(());

impl OpenSession {
    pub fn new() -> OpenSession {
        METRICS.sessions_open.inc();
        OpenSession(())
    }
}

impl Default for OpenSession {
    fn default() -> Self {
        OpenSession::new()
    }
}

impl Drop for OpenSession {
    fn drop(&mut self) {
        METRICS.sessions_open.dec();
    }
}

pub fn bytes_received(n: usize) {
    METRICS.received_bytes.inc_by(n as u64);
}

pub fn message_accepted() {
    METRICS.messages_accepted.inc();
}

/// Logs a message that ends without a 250 and counts it under its reason.
pub fn message_refused(
    session_id: u64,
    client: SocketAddr,
    queue_id: Option<MsgId>,
    reason: Refusal,
) {
    let queue_id = queue_id.map(tracing::field::display);
    info!(event = "message.refused", session_id, %client, queue_id, reason = reason.name());
    METRICS
        .messages_refused
        .get_or_create(&[("reason", reason.name())])
        .inc();
}

pub fn recipient_refused() {
    METRICS.recipients_refused.inc();
}

/// One spool batch: how long its write and sync took, how many records.
pub fn spool_commit(took: Duration, records: usize) {
    METRICS.commit_seconds.observe(took.as_secs_f64());
    METRICS.commit_records.observe(records as f64);
}

pub fn delivery(class: DeliveryClass, outcome: DeliveryOutcome) {
    let c = DeliveryClass::ALL
        .iter()
        .position(|x| *x == class)
        .unwrap_or(0);
    let o = DeliveryOutcome::ALL
        .iter()
        .position(|x| *x == outcome)
        .unwrap_or(0);
    METRICS.deliveries[c][o].inc();
}

pub fn login(succeeded: bool) {
    if succeeded {
        METRICS.logins_succeeded.inc();
    } else {
        METRICS.logins_failed.inc();
    }
}

/// What a scrape reads from the running server besides the counters.
#[derive(Clone, Default)]
pub struct Sources {
    /// For the fsync count.
    pub spool: Option<Spool>,
    /// The outbound manager, for queue sizes.
    pub queue: Option<AdminHandle>,
}

/// Queue states as the outbound scheduler reports them (`QueueOp::Counts`).
const QUEUE_STATES: [&str; 4] = ["queued", "deferred", "held", "in_flight"];

impl Sources {
    /// The whole exposition: the counters, then what is read now.
    pub async fn render(&self) -> String {
        let mut out = String::new();
        let mut live = Registry::with_prefix(PREFIX);
        if let Some(spool) = &self.spool {
            live.register(
                "spool_fsyncs",
                "fdatasync/fsync calls on spool segments",
                ConstCounter::new(spool.sync_count()),
            );
            // The whole queue, local deliveries waiting for a retry
            // included (the recipient states below are outbound's).
            let messages = Gauge::<i64>::default();
            messages.set(i64::try_from(spool.live_count()).unwrap_or(i64::MAX));
            live.register(
                "spool_messages",
                "Messages in the spool not yet finished (local and outbound)",
                messages,
            );
        }
        if let Some(queue) = &self.queue {
            match tokio::time::timeout(QUEUE_ANSWER_TIMEOUT, queue.request(QueueOp::Counts)).await {
                Ok(Ok(counts)) => {
                    let family = Family::<Labels, Gauge>::default();
                    for state in QUEUE_STATES {
                        let n = counts.get(state).and_then(|v| v.as_i64()).unwrap_or(0);
                        family.get_or_create(&[("state", state)]).set(n);
                    }
                    live.register(
                        "queue_recipients",
                        "Recipients in the outbound queue, by state",
                        family,
                    );
                }
                Ok(Err(e)) => warn!(event = "metrics.queue_unavailable", error = %e),
                Err(_) => warn!(
                    event = "metrics.queue_unavailable",
                    error = "no answer in time"
                ),
            }
        }
        // Writing into a String cannot fail.
        let _ = prometheus_text::encode(&mut out, &METRICS.registry);
        let _ = prometheus_text::encode(&mut out, &live);
        out
    }
}

/// Binds the metrics address as the listeners are bound, before the drop
/// from root (see `server::prepare`: a port below 1024 needs root); the
/// error names the key.
pub fn bind(address: SocketAddr) -> Result<std::net::TcpListener, String> {
    crate::server::bind(address)
        .map_err(|e| format!("metrics.address: cannot listen on {address}: {e}"))
}

/// Serves scrapes on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, sources: Sources, shutdown: CancellationToken) {
    let sources = Arc::new(sources);
    let slots = Arc::new(Semaphore::new(MAX_SCRAPES));
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                warn!(event = "metrics.accept_error", error = %e);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let sources = sources.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let sources = sources.clone();
                async move { Ok::<_, Infallible>(answer(&req, &sources).await) }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(SCRAPE_TIMEOUT, connection).await;
            drop(slot);
        });
    }
}

/// The answer to one request.
async fn answer(req: &Request<Incoming>, sources: &Sources) -> Response<Full<Bytes>> {
    respond(req.method(), req.uri().path(), sources).await
}

async fn respond(method: &Method, path: &str, sources: &Sources) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, text: &'static str| {
        let mut r = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
        *r.status_mut() = status;
        r
    };
    if path != PATH {
        return reply(
            StatusCode::NOT_FOUND,
            "not found: metrics are at /metrics\n",
        );
    }
    if method != Method::GET && method != Method::HEAD {
        let mut r = reply(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
        r.headers_mut()
            .insert(ALLOW, hyper::header::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let mut r = Response::new(Full::new(Bytes::from(sources.render().await)));
    r.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(prometheus_text::CONTENT_TYPE),
    );
    r
}

/// Starts the endpoint on an already bound listener and says where.
pub fn start(listener: TcpListener, sources: Sources, shutdown: CancellationToken) {
    match listener.local_addr() {
        Ok(addr) => {
            println!("metrics on http://{addr}{PATH}");
            info!(event = "metrics.start", address = %addr);
        }
        Err(e) => warn!(event = "metrics.start", error = %e),
    }
    tokio::spawn(serve(listener, sources, shutdown));
}

#[cfg(test)]
mod tests;
