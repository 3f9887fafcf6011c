//! One outbound delivery attempt over SMTP or LMTP: the tokio driver around
//! the sans-IO [`tern_proto::client::Client`].
//!
//! [`deliver_from`] takes a routed [`Delivery`] (hosts in preference order,
//! each with its addresses in the order to try) and a [`Feed`] of messages
//! for that destination, and carries as many of them as it can over as few
//! connections as it can: each connection asks the feed for the next
//! message after each outcome (the queue's feed hands out the destination's
//! next job: connection reuse), up to `max_messages_per_connection`, then
//! ends with QUIT and the next one is opened to the same address.
//! [`deliver`] is the same over a fixed list of messages.
//!
//! Moving on. A connection that fails before it could take a message (connect
//! refused, unreachable or timed out; a 4xx or 5xx greeting; 421; TLS
//! required but absent; a broken reply during EHLO) moves on to the next
//! address of the host, then to the next host. A message that was sent has
//! its outcome from the server that answered, final for this attempt; if the
//! connection dies after that, the messages not yet sent move on to the next
//! address like the others. Recipients of messages no server ever took get
//! the last connection-level reason, always as a temporary failure: another
//! attempt may reach another host (Postfix's `smtp_skip_5xx_greeting`).
//!
//! STARTTLS ([`tls`]). The route's [`TlsMode`] says whether the client
//! asks for it and what a missing STARTTLS means; when the client asks for
//! the handshake ([`Event::StartTls`]) the driver runs it with rustls over
//! the same connection and the session goes on over TLS. A failed handshake
//! under `Opportunistic` is followed at once by a plain-text connection to
//! the same address (as RFC 3207 deployments expect); under `Require` and
//! `Verify` the connection fails temporarily (4.7.5, with rustls's reason,
//! e.g. the certificate's) and the next address or host is tried.
//!
//! Invariants (besides these, [`tls`]'s):
//! - Every recipient of every message fed gets exactly one
//!   [`RecipientReport`], in the order of the message's recipients, and
//!   every report names the host that answered, or none when no server
//!   took the message.
//! - Everything the client emits is written, in order and completely,
//!   before more server octets are fed to it (the client's rule).
//! - Not one plain-text octet from the server after its 220 to STARTTLS is
//!   taken as a reply: the client refuses any that came with the 220, and
//!   the driver hands it any already waiting before the handshake starts
//!   (the connection then fails, 4.5.0, without a plain-text retry). Octets
//!   that arrive later reach rustls, which refuses them as records.
//! - Credentials go only over TLS unless `auth_without_tls` (the client's
//!   rule; a plain-text retry after a failed handshake is no exception).
//! - Every wait is bounded: the connect by `connect_timeout`, each reply by
//!   its RFC 5321 §4.5.3.2 stage timeout, the TLS handshake by the command
//!   timeout, each write by the data-block timeout. Reads go through one
//!   fixed buffer; the client bounds what it holds of a reply.
//! - Nothing from the peer can panic the driver; replies in reports are the
//!   client's sanitised ones, and so are rustls's handshake errors.
//! - One `delivery.attempt` log event per connection attempt, saying
//!   whether TLS was used (protocol version and cipher suite).
//!
//! IPv6 refusals. A recipient refused with 5.7.x (policy: large receivers
//! hold IPv6 senders to rules IPv4 has not) over IPv6 is sent again at once
//! to the same host's IPv4 addresses; only their answer counts, and if none
//! takes it the recipient is deferred, not failed.
//!
//! Not done: an idle connection kept open with no message to send (a
//! connection ends as soon as its feed has none), DANE and MTA-STS, TLS session resumption across
//! connections beyond what rustls's shared configuration keeps.
//!
//! Errors: none returned; every failure is a per-recipient
//! [`RecipientReport`] (status, reply, which host) and, per connection, a
//! [`ConnectionReport`]. [`SmtpSettings::prepare_tls`] reports a CA file
//! that cannot be used, for a configuration check at start-up.

pub mod tls;

pub use tls::{TlsCache, TlsMode, TlsSetupError};

use crate::route::{Delivery, Host, Target, Transport};
use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;
use tern_proto::client::{
    Client, ClientConfig, ConnectionFailure, Credentials, Event, Message, MessageOutcome, Protocol,
    Stage, Status, sanitize,
};
use tern_proto::{EnhancedCode, Reply};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::{Instant, timeout};
use tracing::{info, warn};

/// Octets read from the server at a time.
const READ_BUFFER: usize = 16 * 1024;

/// How one delivery attempt behaves.
#[derive(Debug, Clone)]
pub struct SmtpSettings {
    /// Our name in EHLO/LHLO: our host name.
    pub helo_name: String,
    /// The limit for one TCP or Unix connect.
    pub connect_timeout: Duration,
    /// Messages carried by one connection before it is ended and a fresh one
    /// opened; 0 counts as 1.
    pub max_messages_per_connection: usize,
    /// AUTH credentials (for a smarthost).
    pub credentials: Option<Credentials>,
    /// Send the credentials over a connection without TLS (a relay on this
    /// host or a trusted network).
    pub auth_without_tls: bool,
    /// STARTTLS and how much the certificate is trusted.
    pub tls: TlsMode,
    /// PEM certificates trusted as roots under [`TlsMode::Verify`], besides
    /// the bundled web PKI roots (a private CA for a relay).
    pub tls_ca_file: Option<PathBuf>,
    /// The rustls configurations, built once; leave at its default.
    pub tls_cache: TlsCache,
    /// Recipients per transaction (the client's `max_recipients`).
    pub max_recipients: usize,
    /// The timeout for a reply at each stage: RFC 5321 §4.5.3.2 values by
    /// default ([`Stage::timeout`]); tests shorten them.
    pub stage_timeout: fn(Stage) -> Duration,
}

impl Default for SmtpSettings {
    fn default() -> Self {
        SmtpSettings {
            helo_name: "localhost".into(),
            connect_timeout: Duration::from_secs(30),
            max_messages_per_connection: 100,
            credentials: None,
            auth_without_tls: false,
            tls: TlsMode::Opportunistic,
            tls_ca_file: None,
            tls_cache: TlsCache::default(),
            max_recipients: 100,
            stage_timeout: Stage::timeout,
        }
    }
}

impl SmtpSettings {
    /// Builds the TLS configuration the mode needs now, reading the CA file
    /// under `Verify`: for start-up, so that a bad CA file is reported once
    /// rather than as each delivery's temporary failure. Optional: the
    /// first connection that needs it builds it otherwise.
    pub fn prepare_tls(&self) -> Result<(), TlsSetupError> {
        if self.tls == TlsMode::None {
            return Ok(());
        }
        self.tls_cache
            .config(self.tls, self.tls_ca_file.as_deref())
            .map(drop)
    }
}

/// The server a reply came from: the host's name as routed and the address
/// connected to (`192.0.2.1:25`, `[2001:db8::1]:25` or `unix:/path`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub host: String,
    pub address: String,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{}]", self.host, self.address)
    }
}

/// Where one recipient of one message ended up in this attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipientReport {
    pub status: Status,
    /// The server's reply (sanitised), or ours when `local`.
    pub reply: Reply,
    pub local: bool,
    /// The server that took the message and gave this outcome; `None` when
    /// no server took it (the reply is then the last connection failure).
    pub answered_by: Option<Peer>,
}

/// The outcome of one message, recipients in the message's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageReport {
    pub recipients: Vec<RecipientReport>,
    /// The server advertised DSN (see [`MessageOutcome::dsn`]).
    pub dsn: bool,
}

/// How one connection attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionReport {
    pub peer: Peer,
    /// Messages that got their outcome over this connection.
    pub messages: usize,
    /// Why the connection ended early; `None` when it ended with QUIT.
    pub failure: Option<ConnectionFailure>,
    /// The TLS protocol and cipher suite once STARTTLS succeeded, as
    /// "TLSv1.3 TLS13_AES_256_GCM_SHA384"; `None` for plain text.
    pub tls: Option<String>,
    pub duration: Duration,
}

/// Everything one call to [`deliver`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptReport {
    /// One per message, in the order given.
    pub messages: Vec<MessageReport>,
    /// Every connection tried, in order.
    pub connections: Vec<ConnectionReport>,
}

/// Where a connection's messages come from and their outcomes go: the
/// queue feeds a destination's next message over a connection already open
/// to it (connection reuse), a test or a one-off attempt feeds a fixed list.
pub trait Feed: Send {
    /// The next message for this destination, with a key of the feed's
    /// choosing; `None` ends the connection with QUIT.
    fn next(&mut self) -> impl std::future::Future<Output = Option<(usize, Message)>> + Send;
    /// The outcome of the message fed under `key`: from the server that
    /// took it, or (once every host was tried) the last connection failure,
    /// with no `answered_by`.
    fn outcome(&mut self, key: usize, report: MessageReport);
}

/// Delivers `messages` (all for `delivery`'s destination) in one attempt.
/// See the module header for the order hosts are tried in and what counts
/// as final.
pub async fn deliver(
    delivery: &Delivery,
    messages: &[Message],
    settings: &SmtpSettings,
) -> AttemptReport {
    let mut feed = ListFeed {
        messages,
        next: 0,
        reports: vec![None; messages.len()],
    };
    let connections = deliver_from(delivery, &mut feed, settings).await;
    // Messages the feed never handed out: no host could take even the first.
    let never_taken = connections
        .iter()
        .rev()
        .find_map(|c| c.failure.clone())
        .unwrap_or_else(no_host);
    let messages = feed
        .reports
        .into_iter()
        .zip(messages)
        .map(|(report, message)| report.unwrap_or_else(|| not_taken(message, &never_taken)))
        .collect();
    AttemptReport {
        messages,
        connections,
    }
}

/// A fixed list of messages, each reported in its place.
struct ListFeed<'a> {
    messages: &'a [Message],
    next: usize,
    reports: Vec<Option<MessageReport>>,
}

impl Feed for ListFeed<'_> {
    async fn next(&mut self) -> Option<(usize, Message)> {
        let message = self.messages.get(self.next)?.clone();
        self.next += 1;
        Some((self.next - 1, message))
    }

    fn outcome(&mut self, key: usize, report: MessageReport) {
        if let Some(slot) = self.reports.get_mut(key) {
            *slot = Some(report);
        }
    }
}

/// Delivers what `feed` gives for `delivery`'s destination, over as few
/// connections as it can; returns every connection tried, in order.
pub async fn deliver_from<F: Feed>(
    delivery: &Delivery,
    feed: &mut F,
    settings: &SmtpSettings,
) -> Vec<ConnectionReport> {
    // Taken from the feed but not sent: they move on to the next address.
    let mut pending: VecDeque<(usize, Message)> = VecDeque::new();
    let mut connections = Vec::new();
    let mut last_failure: Option<ConnectionFailure> = None;
    let mut feed_done = false;

    'hosts: for host in &delivery.hosts {
        let endpoints: Vec<Endpoint<'_>> = match &host.target {
            Target::Tcp(addrs) => addrs.iter().map(|a| Endpoint::Tcp(*a)).collect(),
            Target::Unix(path) => vec![Endpoint::Unix(path)],
        };
        for endpoint in endpoints {
            let peer = Peer {
                host: host.name.clone(),
                address: endpoint.to_string(),
            };
            let mut mode = settings.tls;
            // Connections to this address, while each ends cleanly with
            // messages left over (the per-connection limit), or once more
            // in plain text after a failed opportunistic handshake.
            loop {
                if pending.is_empty() && !feed_done {
                    match feed.next().await {
                        Some(message) => pending.push_back(message),
                        None => feed_done = true,
                    }
                }
                if pending.is_empty() {
                    break 'hosts;
                }
                let config = client_config(delivery, settings, mode);
                let started = Instant::now();
                let mut end = match endpoint.connect(settings.connect_timeout).await {
                    Err(e) => SessionEnd {
                        messages: 0,
                        failure: Some(connect_failure(&peer, &e)),
                        tls_failed: false,
                        tls: None,
                        feed_done: false,
                        closed_while_idle: false,
                        refused_over_ipv6: Vec::new(),
                    },
                    Ok(stream) => {
                        let address = endpoint.address();
                        let mut run = Session {
                            stream,
                            settings,
                            peer: &peer,
                            mode,
                            address,
                            ipv4_after: address.is_some_and(|a| a.is_ipv6())
                                && !ipv4_of(host).is_empty(),
                        };
                        run.run(config, &mut pending, feed).await
                    }
                };
                for (key, message, report) in std::mem::take(&mut end.refused_over_ipv6) {
                    let report = retry_over_ipv4(delivery, host, message, report, settings).await;
                    feed.outcome(key, report);
                }
                feed_done |= end.feed_done;
                let report = ConnectionReport {
                    peer: peer.clone(),
                    messages: end.messages,
                    failure: end.failure.clone(),
                    tls: end.tls.clone(),
                    duration: started.elapsed(),
                };
                log_attempt(delivery, &report);
                connections.push(report);
                if end.closed_while_idle {
                    continue;
                }
                match end.failure {
                    None if end.messages > 0 => continue,
                    None => break,
                    Some(failure) => {
                        last_failure = Some(failure);
                        if end.tls_failed && mode == TlsMode::Opportunistic {
                            mode = TlsMode::None;
                            continue;
                        }
                        break;
                    }
                }
            }
        }
    }

    let never_taken = last_failure.unwrap_or_else(no_host);
    for (key, message) in pending {
        feed.outcome(key, not_taken(&message, &never_taken));
    }
    connections
}

/// The client's settings for one connection of `delivery` in TLS `mode`.
fn client_config(delivery: &Delivery, settings: &SmtpSettings, mode: TlsMode) -> ClientConfig {
    ClientConfig {
        protocol: match delivery.transport {
            Transport::Smtp => Protocol::Smtp,
            Transport::Lmtp => Protocol::Lmtp,
        },
        helo_name: settings.helo_name.clone(),
        tls: mode.policy(),
        credentials: settings.credentials.clone(),
        auth_without_tls: settings.auth_without_tls,
        max_recipients: settings.max_recipients,
        ..ClientConfig::default()
    }
}

/// The recipients (by position) refused by policy: 5xx with a 5.7.x
/// enhanced code (RFC 3463: security or policy status). Large receivers
/// refuse IPv6 senders for reasons (reverse DNS, reputation) IPv4 does
/// not have.
fn refused_by_policy(report: &MessageReport) -> impl Iterator<Item = usize> + '_ {
    report.recipients.iter().enumerate().filter_map(|(i, r)| {
        let policy = matches!(r.reply.enhanced, Some(EnhancedCode(5, 7, _)));
        (r.status == Status::Permanent && !r.local && policy).then_some(i)
    })
}

fn ipv4_of(host: &Host) -> Vec<SocketAddr> {
    match &host.target {
        Target::Tcp(addrs) => addrs.iter().filter(|a| a.is_ipv4()).copied().collect(),
        Target::Unix(_) => Vec::new(),
    }
}

/// Sends the recipients of `message` that `report` says were refused by
/// policy over IPv6 again, to `host`'s IPv4 addresses, and returns the
/// report with their outcomes from there. One no IPv4 address took is
/// deferred, not failed: it was never tried over IPv4.
async fn retry_over_ipv4(
    delivery: &Delivery,
    host: &Host,
    mut message: Message,
    mut report: MessageReport,
    settings: &SmtpSettings,
) -> MessageReport {
    let refused: Vec<usize> = refused_by_policy(&report).collect();
    message.recipients = refused
        .iter()
        .filter_map(|&i| message.recipients.get(i).cloned())
        .collect();
    info!(event = "delivery.ipv4_retry", destination = delivery.destination.as_str(), host = %host.name, recipients = refused.len());
    let messages = std::slice::from_ref(&message);
    let mut feed = ListFeed {
        messages,
        next: 0,
        reports: vec![None],
    };
    // One connection per IPv4 address until one takes the message; not
    // through `deliver_from`, whose IPv6 refusals come back here.
    for address in ipv4_of(host) {
        let peer = Peer {
            host: host.name.clone(),
            address: address.to_string(),
        };
        let config = client_config(delivery, settings, settings.tls);
        let started = Instant::now();
        let stream = match Endpoint::Tcp(address)
            .connect(settings.connect_timeout)
            .await
        {
            Ok(stream) => stream,
            Err(e) => {
                let report = ConnectionReport {
                    peer: peer.clone(),
                    messages: 0,
                    failure: Some(connect_failure(&peer, &e)),
                    tls: None,
                    duration: started.elapsed(),
                };
                log_attempt(delivery, &report);
                continue;
            }
        };
        let mut session = Session {
            stream,
            settings,
            peer: &peer,
            mode: settings.tls,
            address: Some(address),
            ipv4_after: false,
        };
        let mut pending = VecDeque::new();
        let end = session.run(config, &mut pending, &mut feed).await;
        log_attempt(
            delivery,
            &ConnectionReport {
                peer: peer.clone(),
                messages: end.messages,
                failure: end.failure,
                tls: end.tls,
                duration: started.elapsed(),
            },
        );
        if feed.reports[0].is_some() {
            break;
        }
        // The message is the feed's again for the next address.
        feed.next = 0;
    }
    let outcomes = feed.reports.pop().flatten().map(|m| m.recipients);
    for (&i, again) in refused.iter().zip(outcomes.into_iter().flatten()) {
        if let Some(slot) = report.recipients.get_mut(i) {
            if again.answered_by.is_some() {
                *slot = again;
            } else {
                slot.status = Status::Temporary;
            }
        }
    }
    report
}

/// A connect that failed (refused, unreachable, timed out).
fn connect_failure(peer: &Peer, e: &io::Error) -> ConnectionFailure {
    ConnectionFailure {
        // The host name comes from DNS: sanitised like a server's reply
        // before it reaches a bounce.
        reply: sanitize(&Reply::enhanced(
            451,
            (4, 4, 1),
            format!("cannot connect to {peer}: {e}"),
        )),
        local: true,
    }
}

fn no_host() -> ConnectionFailure {
    ConnectionFailure {
        reply: Reply::enhanced(451, (4, 4, 4), "no host to deliver to"),
        local: true,
    }
}

/// The report of a message no server took: `failure` for every recipient,
/// always temporary (another attempt may reach another host).
fn not_taken(message: &Message, failure: &ConnectionFailure) -> MessageReport {
    MessageReport {
        recipients: message
            .recipients
            .iter()
            .map(|_| RecipientReport {
                status: Status::Temporary,
                reply: failure.reply.clone(),
                local: failure.local,
                answered_by: None,
            })
            .collect(),
        dsn: false,
    }
}

fn log_attempt(delivery: &Delivery, report: &ConnectionReport) {
    let duration_ms = report.duration.as_millis() as u64;
    let tls = report.tls.as_deref().unwrap_or("none");
    match &report.failure {
        None => info!(
            event = "delivery.attempt",
            destination = delivery.destination.as_str(),
            transport = %delivery.transport,
            host = %report.peer.host,
            address = %report.peer.address,
            outcome = "ok",
            messages = report.messages,
            tls,
            duration_ms,
        ),
        Some(failure) => warn!(
            event = "delivery.attempt",
            destination = delivery.destination.as_str(),
            transport = %delivery.transport,
            host = %report.peer.host,
            address = %report.peer.address,
            outcome = "failed",
            messages = report.messages,
            reply = %failure.reply,
            local = failure.local,
            tls,
            duration_ms,
        ),
    }
}

/// One address to connect to.
enum Endpoint<'a> {
    Tcp(SocketAddr),
    Unix(&'a Path),
}

/// A connection: TCP or Unix, then TLS over either after STARTTLS.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

type Stream = Box<dyn Io>;

impl Endpoint<'_> {
    async fn connect(&self, limit: Duration) -> io::Result<Stream> {
        let connecting = async {
            Ok(match self {
                Endpoint::Tcp(addr) => Box::new(TcpStream::connect(*addr).await?) as Stream,
                Endpoint::Unix(path) => Box::new(UnixStream::connect(path).await?) as Stream,
            })
        };
        match timeout(limit, connecting).await {
            Ok(result) => result,
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
        }
    }

    fn address(&self) -> Option<SocketAddr> {
        match self {
            Endpoint::Tcp(addr) => Some(*addr),
            Endpoint::Unix(_) => None,
        }
    }
}

impl fmt::Display for Endpoint<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp(addr) => write!(f, "{addr}"),
            Endpoint::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// How one connection ended.
struct SessionEnd {
    /// Messages that got their outcome over it.
    messages: usize,
    failure: Option<ConnectionFailure>,
    /// The failure followed our answer `tls_failed` to `StartTls`.
    tls_failed: bool,
    /// The TLS in use (see [`ConnectionReport::tls`]).
    tls: Option<String>,
    /// The feed said it has nothing more.
    feed_done: bool,
    /// The server closed (or spoke) while the connection waited for the
    /// feed: not a failure of the destination.
    closed_while_idle: bool,
    /// Messages with recipients refused by policy (5.7.x) over IPv6, to be
    /// retried over IPv4 before their outcome goes to the feed.
    refused_over_ipv6: Vec<(usize, Message, MessageReport)>,
}

/// One connection being driven.
struct Session<'a> {
    stream: Stream,
    settings: &'a SmtpSettings,
    peer: &'a Peer,
    /// The mode of this connection (`None` on a plain-text retry).
    mode: TlsMode,
    /// The TCP address connected to; `None` for a Unix socket.
    address: Option<SocketAddr>,
    /// An IPv6 connection to a host that also has IPv4 addresses: a 5.7.x
    /// refusal here is retried over IPv4 before it counts.
    ipv4_after: bool,
}

/// How a STARTTLS handshake went.
enum Handshake {
    Done(String),
    /// Plain-text octets were waiting after the 220 (or the server closed):
    /// the client was told, and fails the connection itself.
    Refused,
    Failed(String),
}

impl<'a> Session<'a> {
    /// Takes messages from `pending`, then from `feed`, while the
    /// connection can carry them; their outcomes go to `feed`. A message
    /// handed to the client always gets its outcome (the client's
    /// invariant), so none is lost from `pending` without one.
    async fn run<F: Feed>(
        &mut self,
        config: ClientConfig,
        pending: &mut VecDeque<(usize, Message)>,
        feed: &mut F,
    ) -> SessionEnd {
        let limit = self.settings.max_messages_per_connection.max(1);
        let mut client = Client::new(config);
        let mut buf = vec![0u8; READ_BUFFER];
        let mut in_flight: Option<(usize, Message)> = None;
        let mut end = SessionEnd {
            messages: 0,
            failure: None,
            tls_failed: false,
            tls: None,
            feed_done: false,
            closed_while_idle: false,
            refused_over_ipv6: Vec::new(),
        };
        let mut handshake_error: Option<String> = None;
        let mut writable = true;
        loop {
            while let Some(event) = client.next_event() {
                match event {
                    Event::Write(octets) => {
                        // Writes the client queued before it learnt of a
                        // broken stream would each wait out the limit again.
                        if !writable {
                            continue;
                        }
                        let limit = (self.settings.stage_timeout)(Stage::DataBlock);
                        match timeout(limit, self.stream.write_all(&octets)).await {
                            Ok(Ok(())) => {}
                            Ok(Err(_)) => {
                                writable = false;
                                client.eof();
                            }
                            Err(_) => {
                                writable = false;
                                client.timeout();
                            }
                        }
                    }
                    Event::StartTls => match self.start_tls(&mut client, &mut buf).await {
                        Handshake::Done(description) => {
                            end.tls = Some(description);
                            client.tls_established();
                        }
                        Handshake::Refused => {}
                        Handshake::Failed(reason) => {
                            // The handshake took the stream with it, or
                            // never started; either way nothing more goes
                            // to this server.
                            writable = false;
                            handshake_error = Some(reason);
                            client.tls_failed();
                        }
                    },
                    Event::TlsDeclined(reply) => {
                        info!(event = "delivery.tls_declined", host = %self.peer, reply = %reply);
                    }
                    Event::Ready => {
                        let next = if end.messages >= limit {
                            None
                        } else if let Some(next) = pending.pop_front() {
                            Some(next)
                        } else if end.feed_done {
                            None
                        } else {
                            let next = feed.next().await;
                            end.feed_done = next.is_none();
                            // The wait may have been long enough for the
                            // server to close an idle session: then the
                            // message goes on a new connection instead of
                            // failing on this one.
                            if next.is_some()
                                && read_now(&mut self.stream, &mut buf).await.is_some()
                            {
                                pending.extend(next);
                                end.closed_while_idle = true;
                                writable = false;
                                client.eof();
                                continue;
                            }
                            next
                        };
                        match next {
                            Some((key, message)) => match client.send(message.clone()) {
                                Ok(()) => in_flight = Some((key, message)),
                                // Not expected after Ready; the message stays
                                // pending for the next connection.
                                Err(_) => {
                                    pending.push_front((key, message));
                                    client.quit();
                                }
                            },
                            None => client.quit(),
                        }
                    }
                    Event::Outcome(outcome) => {
                        if let Some((key, message)) = in_flight.take() {
                            let report = self.report(outcome);
                            if self.ipv4_after && refused_by_policy(&report).next().is_some() {
                                end.refused_over_ipv6.push((key, message, report));
                            } else {
                                feed.outcome(key, report);
                            }
                            end.messages += 1;
                        }
                    }
                    Event::Failed(failure) => {
                        end.failure = Some(match handshake_error.take() {
                            // The client's reason is generic; rustls's says
                            // what to fix (a certificate, a protocol).
                            Some(reason) => {
                                end.tls_failed = true;
                                ConnectionFailure {
                                    reply: sanitize(&Reply::enhanced(
                                        451,
                                        (4, 7, 5),
                                        format!(
                                            "TLS handshake with {} failed: {reason}",
                                            self.peer
                                        ),
                                    )),
                                    local: true,
                                }
                            }
                            None => failure,
                        });
                    }
                    Event::Close => {
                        // The peer may already be gone; nothing is owed to it.
                        if writable {
                            let _ = timeout(Duration::from_secs(1), self.stream.shutdown()).await;
                        }
                        return end;
                    }
                }
            }
            // No reply is awaited only during the handshake (answered at
            // once above) or when idle (never: Ready is answered with a
            // message or QUIT); a guard against waiting for ever anyway.
            let stage = client.stage().unwrap_or(Stage::Command);
            match timeout(
                (self.settings.stage_timeout)(stage),
                self.stream.read(&mut buf),
            )
            .await
            {
                Ok(Ok(0)) | Ok(Err(_)) => client.eof(),
                Ok(Ok(n)) => client.receive(&buf[..n]),
                Err(_) => client.timeout(),
            }
        }
    }

    /// Runs the handshake over the connection, which becomes the TLS
    /// stream; on failure the connection is left closed.
    async fn start_tls(&mut self, client: &mut Client, buf: &mut [u8]) -> Handshake {
        match read_now(&mut self.stream, buf).await {
            None => {}
            Some(Ok(0)) | Some(Err(_)) => {
                client.eof();
                return Handshake::Refused;
            }
            Some(Ok(n)) => {
                client.receive(&buf[..n]);
                return Handshake::Refused;
            }
        }
        let config = match self
            .settings
            .tls_cache
            .config(self.mode, self.settings.tls_ca_file.as_deref())
        {
            Ok(config) => config,
            Err(e) => return Handshake::Failed(e.to_string()),
        };
        let name = tls::server_name(&self.peer.host, self.address);
        let connector = tokio_rustls::TlsConnector::from(config);
        let plain = std::mem::replace(&mut self.stream, Box::new(Closed));
        let limit = (self.settings.stage_timeout)(Stage::Command);
        match timeout(limit, connector.connect(name, plain)).await {
            Ok(Ok(stream)) => {
                let description = tls::describe(stream.get_ref().1);
                self.stream = Box::new(stream);
                Handshake::Done(description)
            }
            Ok(Err(e)) => Handshake::Failed(e.to_string()),
            Err(_) => Handshake::Failed("timed out".into()),
        }
    }

    fn report(&self, outcome: MessageOutcome) -> MessageReport {
        MessageReport {
            recipients: outcome
                .recipients
                .into_iter()
                .map(|r| RecipientReport {
                    status: r.status,
                    reply: r.reply,
                    local: r.local,
                    answered_by: Some(self.peer.clone()),
                })
                .collect(),
            dsn: outcome.dsn,
        }
    }
}

/// Reads what is already waiting, without waiting: `None` when nothing is.
async fn read_now(stream: &mut Stream, buf: &mut [u8]) -> Option<io::Result<usize>> {
    std::future::poll_fn(|cx| {
        let mut read = ReadBuf::new(&mut *buf);
        match Pin::new(&mut *stream).poll_read(cx, &mut read) {
            Poll::Ready(Ok(())) => Poll::Ready(Some(Ok(read.filled().len()))),
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
            Poll::Pending => Poll::Ready(None),
        }
    })
    .await
}

/// Stands in for a connection consumed by a failed handshake: reads end,
/// writes fail.
struct Closed;

impl AsyncRead for Closed {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        _buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Closed {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        _buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Err(io::ErrorKind::NotConnected.into()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut std::task::Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_tls;
