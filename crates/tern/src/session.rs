//! The I/O driver for one SMTP connection: feeds socket bytes into the
//! sans-IO [`tern_proto::Session`], answers its queries with policy (recipient
//! lookup, relay permission, free space) and the spool, and writes its replies.
//!
//! Invariants:
//! - `250` at end of data is written only after `Spool::commit` returned,
//!   i.e. after the fdatasync that covers the message (RFC 5321 §4.1.1.4:
//!   the receiver takes responsibility with the 250).
//! - Replies are written in order; the protocol engine answers pipelined
//!   commands one at a time, so policy sees them in order too.
//! - Nothing is read from the socket while a query is being decided (OpenSMTPD
//!   pauses input during filter phases): input cannot race past a decision.
//! - No `Authentication-Results:` field under our host name reaches the
//!   spool (RFC 8601 §5): the header section is filtered as it streams in.
//! - An idle session holds no read buffer: bytes are read into a stack buffer
//!   only once the socket is readable (memory per idle session is measured).
//!
//! Not here: connection limits (listener), delivery (queue), protocol rules
//! (tern-proto).
//!
//! Errors: socket errors end the session silently (logged); spool errors turn
//! into `452 4.3.1` (out of space, quota or file-size limit) or `451 4.3.0`
//! (any other storage failure) for the message concerned, never a 250, and
//! the session goes on.

use crate::auth::{
    Accounts, AuthStep, AuthenticatedUser, ChannelBinding, Exchange, LoginOutcome, Service,
};
use crate::config::{LiveRuntime, Role, Runtime, canonical_ip};
use crate::conn::Conn;
use crate::dkim::Signers;
use crate::egress::{Egress, UserLimits};
use crate::metrics::{self, Refusal};
use crate::policy::{Policy, SessionFacts};
use crate::queue::{QueueHandle, Work};
use crate::sendmail::LocalClient;
use crate::spool::{Draft, Envelope, MsgId, RcptStatus, Recipient, Route, Spool, SpoolError};
use crate::submission;
use crate::tls::{ServerTls, TlsInfo};
use std::collections::HashSet;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tern_proto::headers::ForgedResultsFilter;
use tern_proto::{
    BodyType, Decision, Event, ForwardPath, MailParams, Phase, Query, RcptParams, Reply, Ret,
    ReversePath, SaslData, Session,
};
use tokio::io::AsyncWriteExt;
use tokio::time::{Instant, timeout, timeout_at};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// What every session shares.
pub struct Context {
    /// The config in force; each session keeps the one it started with.
    pub runtime: Arc<LiveRuntime>,
    pub spool: Spool,
    pub queue: QueueHandle,
    /// Cancelled on SIGTERM: idle sessions answer `421 4.3.2` and close.
    pub shutdown: CancellationToken,
    pub free_space: FreeSpace,
    pub tls: Arc<ServerTls>,
    /// DKIM keys of our domains, for mail our own users send (replaced by a
    /// reload).
    pub dkim: arc_swap::ArcSwap<Signers>,
    /// Logins for SMTP AUTH.
    pub accounts: Arc<Accounts>,
    /// Per-user egress limits and the circuit breaker.
    pub egress: Arc<crate::egress::Egress>,
}

/// The spool's free space, asked of the file system at most once a second:
/// every MAIL needs it, and it moves slowly compared with a MAIL rate in the
/// thousands per second. A cached figure only ever accepts: one below the
/// reserve is measured again before it refuses, so the first MAIL after
/// space came back is accepted (a `statvfs` costs microseconds, and only a
/// refusal pays it).
#[derive(Default)]
pub struct FreeSpace {
    bytes: AtomicU64,
    /// Milliseconds since the Unix epoch of the last `statvfs`; 0 = never.
    checked_at: AtomicU64,
}

impl FreeSpace {
    /// Free bytes, from the cache when that covers `needed`.
    fn get(&self, spool: &Spool, needed: u64) -> io::Result<u64> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let checked = self.checked_at.load(Ordering::Relaxed);
        if checked != 0 && now.saturating_sub(checked) < 1000 {
            let cached = self.bytes.load(Ordering::Relaxed);
            if cached >= needed {
                return Ok(cached);
            }
        }
        let bytes = spool.free_space()?;
        self.bytes.store(bytes, Ordering::Relaxed);
        self.checked_at.store(now, Ordering::Relaxed);
        Ok(bytes)
    }
}

static SESSION_IDS: AtomicU64 = AtomicU64::new(1);

/// The transaction as the driver sees it: the resolved recipients and the
/// draft the body streams into.
struct Transaction {
    sender: String,
    params: MailParams,
    recipients: Vec<Recipient>,
    /// Local mailboxes and remote addresses already in `recipients`: one copy
    /// each, however many RCPTs (or aliases) lead there.
    destinations: HashSet<(bool, String)>,
    draft: Option<Draft>,
    draft_error: Option<io::Error>,
    /// Removes forged results under our name from the header section, with
    /// the buffer its output goes through; boxed, as a transaction is part
    /// of every session's state, idle ones included.
    forged_results: Box<(ForgedResultsFilter, Vec<u8>)>,
    /// Reserved when the content starts, so the `Received:` header can
    /// name the ID the 250 reply and the logs will use.
    queue_id: Option<MsgId>,
    /// Our `Received:` field, made when the content starts and put in front
    /// of the message when it ends (after anything else we add).
    received: Vec<u8>,
    /// Remote recipients accepted so far that the user never wrote to
    /// before (egress limits, authenticated sessions only).
    new_remote: u32,
}

struct Driver {
    ctx: Arc<Context>,
    /// The config this session started with.
    runtime: Arc<Runtime>,
    session: Session,
    peer: SocketAddr,
    /// Our end of the connection: mail to its address literal is ours.
    local_ip: Option<IpAddr>,
    session_id: u64,
    out: Vec<u8>,
    tx: Option<Transaction>,
    /// When the client must have completed what it is sending now: a
    /// command line within `command_timeout` of our last reply; message data
    /// within `data_timeout` of the last reply or of the last
    /// [`DATA_PROGRESS`] bytes. Not reset by every read, so a client
    /// trickling a byte at a time cannot hold a session forever.
    deadline: Instant,
    /// The phase the deadline was set for: a new phase gets its own limit.
    deadline_phase: Phase,
    /// Bytes read since the deadline was last set.
    progress: usize,
    /// The code of the last reply queued: whether the session ends over an error.
    last_reply_code: u16,
    /// Set once TLS is up (boxed: most sessions on port 25 stay plain).
    tls: Option<Box<TlsInfo>>,
    role: Role,
    /// The account that authenticated (SMTP AUTH), if any (boxed: most
    /// sessions never log in).
    login: Option<Box<AuthenticatedUser>>,
    /// A SASL exchange in progress between `334` challenges.
    exchange: Option<Box<Exchange>>,
    /// The local user on the other end of the sendmail socket (boxed: most
    /// sessions come over TCP).
    local_client: Option<Box<LocalClient>>,
}

/// Runs the server side of a TLS handshake on `conn`, within `limit` (a
/// client that stalls mid-handshake holds a connection slot no longer than
/// an idle one).
async fn handshake(conn: Conn, tls: &ServerTls, limit: Duration) -> io::Result<(Conn, TlsInfo)> {
    let stream = timeout(limit, tls.acceptor.accept(conn))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timeout"))??;
    let info = TlsInfo::of(stream.get_ref().1);
    Ok((Conn::Tls(Box::new(stream)), info))
}

/// Message data that counts as progress and earns a new `data_timeout`
/// (RFC 5321 §4.5.3.2.6 times each data block; a slow but honest client of a
/// large message keeps going, a trickle does not).
const DATA_PROGRESS: usize = 64 * 1024;

/// Runs one connection to its end. `local` is our end of it.
pub async fn run(
    conn: Conn,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    role: Role,
    ctx: Arc<Context>,
) {
    let session_id = SESSION_IDS.fetch_add(1, Ordering::Relaxed);
    info!(event = "session.connect", session_id, client = %peer, %role);
    run_session(conn, peer, local, role, None, session_id, ctx).await;
}

/// Runs one session of a local user's program on the sendmail socket
/// (`tern sendmail`): trusted to relay as Postfix's local submission is,
/// and known by its uid instead of an address.
pub async fn run_local(conn: Conn, client: LocalClient, ctx: Arc<Context>) {
    let session_id = SESSION_IDS.fetch_add(1, Ordering::Relaxed);
    info!(event = "session.connect", session_id, client = "local", uid = client.uid, pid = client.pid, login = client.login.as_deref(), role = %Role::Local);
    // No address: the loopback one stands in where a session needs one
    // (the uid decides trust, and the headers and envelope name the uid).
    let peer = SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, 0));
    run_session(
        conn,
        peer,
        None,
        Role::Local,
        Some(Box::new(client)),
        session_id,
        ctx,
    )
    .await;
}

async fn run_session(
    mut conn: Conn,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    role: Role,
    local_client: Option<Box<LocalClient>>,
    session_id: u64,
    ctx: Arc<Context>,
) {
    let _open = metrics::OpenSession::new();
    // The whole session runs on the config it started with: a reload
    // changes what new sessions get, never the rules mid-transaction.
    let runtime = ctx.runtime.load_full();
    let mut tls = None;
    if role.implicit_tls() {
        let limit = runtime.limits.command_timeout;
        match handshake(conn, &ctx.tls, limit).await {
            Ok((tls_conn, info)) => {
                info!(event = "session.tls", session_id, version = %info.version, cipher = %info.cipher, sni = info.server_name.as_deref());
                conn = tls_conn;
                tls = Some(Box::new(info));
            }
            Err(e) => {
                info!(event = "session.tls_failed", session_id, client = %peer, error = %e);
                return;
            }
        }
    }
    let config = runtime.server_config_for(role, peer.ip());
    let session = match &tls {
        Some(info) => {
            let mut s = Session::over_tls(config);
            s.set_channel_binding(info.channel_binding.is_some());
            s
        }
        None => Session::new(config),
    };
    let deadline = Instant::now() + runtime.limits.command_timeout;
    let local_ip = local.map(|a| canonical_ip(a.ip()));
    let mut driver = Driver {
        ctx,
        runtime,
        session,
        peer,
        local_ip,
        session_id,
        out: Vec::new(),
        tx: None,
        deadline,
        deadline_phase: Phase::Command,
        progress: 0,
        last_reply_code: 0,
        tls,
        role,
        login: None,
        exchange: None,
        local_client,
    };
    match driver.drive(&mut conn).await {
        Ok(()) => debug!(event = "session.close", session_id),
        Err(e) => debug!(event = "session.close", session_id, error = %e),
    }
    // A socket error mid-message (reset, write timeout) ends it here.
    driver.abort_message(Refusal::ClientGone);
    // Only a session we end over an error lingers: after a 221 the client
    // has nothing left to send, and its close is all that would be read.
    // A task of its own, so its state is not part of every session's.
    if driver.last_reply_code >= 400 {
        tokio::spawn(linger(conn, driver.ctx.shutdown.clone()));
    } else {
        let _ = conn.shutdown().await;
    }
}

/// How long, and how many octets, a closing session keeps reading.
const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_OCTETS: usize = 1024 * 1024;

/// Reads and drops what the client still sends after our last reply and
/// FIN. A socket closed with unread input answers with a reset, and a
/// reset can make the client's stack discard our last reply before the
/// client reads it: the 552 to an oversized BDAT whose chunk is still
/// coming, the 554 to an early talker. A client that closes after our
/// reply (QUIT) ends this at once.
async fn linger(mut conn: Conn, shutdown: CancellationToken) {
    if conn.shutdown().await.is_err() {
        return;
    }
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = drain_until_closed(&mut conn) => {}
    }
}

async fn drain_until_closed(conn: &mut Conn) {
    let deadline = Instant::now() + LINGER_TIME;
    let mut dropped = 0;
    while dropped < LINGER_OCTETS {
        match timeout_at(deadline, conn.read_into(&mut |_| {})).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
            Ok(Ok(n)) => dropped += n,
        }
    }
}

impl Driver {
    async fn drive(&mut self, conn: &mut Conn) -> io::Result<()> {
        self.greeting_delay(conn).await?;
        loop {
            while let Some(event) = self.session.next_event() {
                match event {
                    Event::Reply(reply) => {
                        self.last_reply_code = reply.code;
                        self.out.extend_from_slice(&reply.to_bytes());
                    }
                    Event::Query(query) => {
                        let decision = self.decide(query).await;
                        self.session.decide(decision);
                    }
                    Event::Body(chunk) => self.body(&chunk).await,
                    Event::MessageAborted(broken) => {
                        self.abort_message(broken.map_or(Refusal::Aborted, Refusal::Content))
                    }
                    Event::MessageRefused(broken) => {
                        self.tx = None;
                        self.refused(None, Refusal::Content(broken));
                    }
                    Event::Close => {
                        self.flush(conn).await?;
                        return Ok(());
                    }
                    Event::StartTls => {
                        // The 220 goes out in plain text; then the raw stream
                        // belongs to the handshake. The engine dropped every
                        // octet the client sent after STARTTLS.
                        self.flush(conn).await?;
                        self.start_tls(conn).await;
                    }
                }
            }
            if self.session.is_closed() {
                return self.flush(conn).await;
            }
            let phase = self.session.phase();
            let progressed = phase == Phase::Data && self.progress >= DATA_PROGRESS;
            if !self.out.is_empty() || phase != self.deadline_phase || progressed {
                let limits = &self.runtime.limits;
                let limit = match phase {
                    Phase::Command => limits.command_timeout,
                    Phase::Data => limits.data_timeout,
                };
                self.deadline = Instant::now() + limit;
                self.deadline_phase = phase;
                self.progress = 0;
            }
            self.flush(conn).await?;
            self.wait_for_input(conn).await?;
        }
    }

    /// Waits before the greeting, reading whatever arrives: the protocol
    /// engine rejects a client that talks first (RFC 5321 §4.3.1: the client
    /// must wait for the 220), which is how most spam bots give themselves away.
    /// Only on `mx` listeners: mail clients on submission ports log in and
    /// are not spam bots, and would pay the delay on every connection (at
    /// 300 ms, 20 sessions top out at ~66 logins/s).
    async fn greeting_delay(&mut self, conn: &mut Conn) -> io::Result<()> {
        let delay = self.runtime.limits.greeting_delay;
        if delay.is_zero() || self.role != Role::Mx {
            return Ok(());
        }
        let session = &mut self.session;
        match timeout_at(
            Instant::now() + delay,
            conn.read_into(&mut |bytes| session.receive(bytes)),
        )
        .await
        {
            Err(_) => Ok(()),
            Ok(Ok(n @ 1..)) => {
                metrics::bytes_received(n);
                Ok(())
            }
            Ok(Ok(0)) => {
                session.eof();
                Ok(())
            }
            Ok(Err(e)) => Err(e),
        }
    }

    async fn wait_for_input(&mut self, conn: &mut Conn) -> io::Result<()> {
        let session = &mut self.session;
        let mut feed = |bytes: &[u8]| session.receive(bytes);
        let read = tokio::select! {
            _ = self.ctx.shutdown.cancelled() => None,
            read = timeout_at(self.deadline, conn.read_into(&mut feed)) => Some(read),
        };
        match read {
            None => {
                self.abort_message(Refusal::Shutdown);
                self.session.shutdown();
            }
            Some(Err(_)) => {
                info!(event = "session.timeout", session_id = self.session_id);
                self.abort_message(Refusal::Timeout);
                self.session.timeout();
            }
            Some(Ok(Ok(0))) => {
                self.abort_message(Refusal::ClientGone);
                self.session.eof();
            }
            Some(Ok(Ok(n))) => {
                metrics::bytes_received(n);
                self.progress = self.progress.saturating_add(n);
            }
            Some(Ok(Err(e))) => return Err(e),
        }
        Ok(())
    }

    async fn flush(&mut self, conn: &mut Conn) -> io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let limit = self.runtime.limits.command_timeout;
        let written = timeout(limit, conn.send(&self.out)).await;
        self.out.clear();
        if self.out.capacity() > 4096 {
            self.out.shrink_to(1024);
        }
        match written {
            Ok(result) => result,
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "write timeout")),
        }
    }

    /// Runs the STARTTLS handshake (RFC 3207 §4) and tells the engine how
    /// it went; a failed handshake leaves nothing to talk over.
    async fn start_tls(&mut self, conn: &mut Conn) {
        let plain = std::mem::replace(conn, Conn::Taken);
        let limit = self.runtime.limits.command_timeout;
        match handshake(plain, &self.ctx.tls, limit).await {
            Ok((tls_conn, info)) => {
                info!(event = "session.tls", session_id = self.session_id, version = %info.version, cipher = %info.cipher, sni = info.server_name.as_deref());
                *conn = tls_conn;
                self.session.tls_established();
                self.session
                    .set_channel_binding(info.channel_binding.is_some());
                self.tls = Some(Box::new(info));
            }
            Err(e) => {
                info!(event = "session.tls_failed", session_id = self.session_id, client = %self.peer, error = %e);
                self.session.tls_failed();
            }
        }
    }

    /// AUTH (RFC 4954): starts the mechanism's exchange with the accounts
    /// store, which checks its limits before any password hash.
    async fn auth_start(&mut self, mechanism: &str, initial: Option<SaslData>) -> Decision {
        let tls_exporter = self.tls.as_ref().and_then(|t| t.channel_binding);
        let binding = ChannelBinding {
            tls_exporter,
            // The engine offers -PLUS only over a channel that can be bound.
            plus_advertised: tls_exporter.is_some()
                && self
                    .runtime
                    .auth_mechanisms
                    .iter()
                    .any(|m| m.ends_with("-PLUS")),
        };
        match self
            .ctx
            .accounts
            .start(mechanism, self.peer.ip(), Service::Submission, binding)
        {
            Ok(exchange) => {
                self.exchange = Some(Box::new(exchange));
                self.auth_step(initial.as_ref().map(SaslData::as_bytes))
                    .await
            }
            Err(e) => {
                info!(event = "auth.refused", session_id = self.session_id, client = %self.peer, mechanism, error = %e);
                Decision::Reject(Reply::enhanced(
                    504,
                    (5, 5, 4),
                    "Error: unrecognized authentication type",
                ))
            }
        }
    }

    /// One more round of the SASL exchange in progress.
    async fn auth_step(&mut self, response: Option<&[u8]>) -> Decision {
        let Some(exchange) = self.exchange.as_mut() else {
            return Decision::Reject(Reply::enhanced(
                503,
                (5, 5, 1),
                "Error: no authentication in progress",
            ));
        };
        match exchange.step(response).await {
            AuthStep::Challenge(challenge) => Decision::AuthChallenge(challenge),
            AuthStep::Done(outcome) => {
                self.exchange = None;
                metrics::login(matches!(outcome, LoginOutcome::Success(_)));
                let reply = outcome.reply();
                if let LoginOutcome::Success(user) = outcome {
                    info!(event = "session.authenticated", session_id = self.session_id, user = %user.name, via = %user.via);
                    self.login = Some(Box::new(user));
                    return Decision::Accept;
                }
                let (a, b, c) = enhanced_triple(reply.enhanced);
                let r = Reply::enhanced(reply.code, (a, b, c), reply.text);
                if reply.disconnect {
                    Decision::Disconnect(r)
                } else {
                    Decision::Reject(r)
                }
            }
        }
    }

    async fn decide(&mut self, query: Query) -> Decision {
        match query {
            Query::Auth { mechanism, initial } => self.auth_start(&mechanism, initial).await,
            Query::AuthResponse(data) => self.auth_step(Some(data.as_bytes())).await,
            Query::Connect => self.policy().connect(&self.facts()),
            Query::Helo { domain, .. } => self.policy().helo(&self.facts(), &domain),
            Query::Mail { from, params } => self.mail(from, params),
            Query::Rcpt { to, params } => self.rcpt(to, params),
            Query::Data => self.data().await,
            Query::EndOfData => self.end_of_data().await,
        }
    }

    fn mail(&mut self, from: ReversePath, params: MailParams) -> Decision {
        let limits = &self.runtime.limits;
        let needed = limits
            .min_free_space
            .saturating_add(params.size.unwrap_or(0));
        match self.ctx.free_space.get(&self.ctx.spool, needed) {
            Ok(free) if free >= needed => {}
            Ok(free) => {
                warn!(
                    event = "mail.reject",
                    session_id = self.session_id,
                    free,
                    needed,
                    "spool disk below reserve"
                );
                self.refused(None, Refusal::StorageFull);
                return Decision::Reject(storage_full());
            }
            Err(e) => {
                warn!(event = "mail.reject", session_id = self.session_id, error = %e, "cannot read spool free space");
                self.refused(None, Refusal::storage(&e));
                return Decision::Reject(local_error());
            }
        }
        let sender = match &from {
            ReversePath::Null => String::new(),
            ReversePath::Mailbox(m) => m.to_string(),
        };
        let limits = match &self.login {
            Some(login) => self.user_limits(&login.name),
            None => UserLimits::default(),
        };
        let verdict = self
            .policy()
            .mail(&self.facts(), self.login.as_deref(), &sender, &limits);
        if verdict != Decision::Accept {
            self.refused(None, Refusal::Policy);
            return verdict;
        }
        self.tx = Some(Transaction {
            sender,
            params,
            recipients: Vec::new(),
            destinations: HashSet::new(),
            draft: None,
            draft_error: None,
            forged_results: Box::new((
                ForgedResultsFilter::new(&self.runtime.hostname),
                Vec::new(),
            )),
            queue_id: None,
            received: Vec::new(),
            new_remote: 0,
        });
        Decision::Accept
    }

    fn rcpt(&mut self, to: ForwardPath, params: RcptParams) -> Decision {
        let facts = self.facts();
        if self.tx.is_none() {
            return Decision::Reject(Reply::enhanced(503, (5, 5, 1), "Error: need MAIL command"));
        }
        let destinations = match self.policy().rcpt(&facts, &to) {
            Ok(destinations) => destinations,
            Err(reply) => {
                metrics::recipient_refused();
                return Decision::Reject(reply);
            }
        };
        let given = match &to {
            ForwardPath::Postmaster => "Postmaster".to_string(),
            ForwardPath::Mailbox(m) => m.to_string(),
        };
        let orcpt = params
            .orcpt
            .as_ref()
            .map(|o| format!("{};{}", o.addr_type, o.address));
        let notify = params.notify.as_ref().map(notify_string);
        if let Some(user) = &facts.user {
            let limits = self.user_limits(user);
            let Some(tx) = self.tx.as_mut() else {
                return Decision::Reject(Reply::enhanced(
                    503,
                    (5, 5, 1),
                    "Error: need MAIL command",
                ));
            };
            if let Err(reply) = egress_rcpt(&self.ctx.egress, user, &limits, tx, &destinations) {
                info!(event = "rcpt.reject", session_id = facts.session_id, user = %user, rcpt = %given, reason = "egress limit");
                metrics::recipient_refused();
                return Decision::Reject(reply);
            }
        }
        let Some(tx) = self.tx.as_mut() else {
            return Decision::Reject(Reply::enhanced(503, (5, 5, 1), "Error: need MAIL command"));
        };
        for (address, route) in destinations {
            let key = match &route {
                Route::Local { mailbox } => (true, mailbox.clone()),
                Route::Remote => (false, address.to_lowercase()),
            };
            if tx.destinations.insert(key) {
                tx.recipients.push(Recipient {
                    address,
                    original: given.clone(),
                    orcpt: orcpt.clone(),
                    notify: notify.clone(),
                    route,
                    status: RcptStatus::Pending,
                });
            }
        }
        Decision::Accept
    }

    async fn data(&mut self) -> Decision {
        let helo = self.session.helo_domain().unwrap_or("unknown").to_string();
        let verdict = self.policy().data(self.login.as_deref());
        if verdict != Decision::Accept {
            self.refused(None, Refusal::Policy);
            return verdict;
        }
        let Some(tx) = self.tx.as_mut() else {
            return Decision::Reject(Reply::enhanced(503, (5, 5, 1), "Error: need MAIL command"));
        };
        let protocol = self.session.received_protocol(tx.params.smtputf8);
        let single = match tx.recipients.as_slice() {
            [only] if only.original.is_ascii() || tx.params.smtputf8 => {
                Some(only.original.as_str())
            }
            _ => None,
        };
        // RFC 6531 §3.7.3: a message that is not internationalised keeps its
        // header fields ASCII; a U-label HELO name is replaced by the address.
        let helo = if helo.is_ascii() || tx.params.smtputf8 {
            helo
        } else {
            address_literal(self.peer)
        };
        let id = self.ctx.spool.reserve_id();
        tx.queue_id = Some(id);
        let show_client = self.login.is_none() || self.runtime.received_client_address;
        let from = match &self.local_client {
            Some(client) => local_from_clause(client.uid),
            None if show_client => from_clause(&helo, self.peer),
            None => String::new(),
        };
        let header = received_header_from(
            from,
            self.tls.as_deref(),
            &self.runtime.hostname,
            protocol,
            &id.to_string(),
            single,
        );
        tx.received = header;
        tx.draft = Some(self.ctx.spool.draft());
        Decision::Accept
    }
}

impl Driver {
    async fn body(&mut self, chunk: &[u8]) {
        let Some(tx) = self.tx.as_mut() else { return };
        if tx.draft_error.is_some() {
            return;
        }
        let (filter, filtered) = &mut *tx.forged_results;
        let chunk = filter.feed(chunk, filtered);
        if let Some(draft) = tx.draft.as_mut()
            && let Err(e) = draft.write(chunk).await
        {
            let queue_id = tx.queue_id.map(|id| id.to_string());
            warn!(event = "draft.error", session_id = self.session_id, queue_id, error = %e);
            tx.draft_error = Some(e);
        }
    }

    /// For mail our own users send (authenticated, local through the
    /// sendmail socket, or from a trusted network): the submission rules
    /// when authenticated (RFC 6409: author fields must be theirs; missing
    /// `Date:`/`Message-ID:` are added), missing `Date:`/`Message-ID:` for
    /// local mail too (cron and scripts often write neither), then DKIM
    /// signatures for the author's domain. Other mail is stored as it came.
    /// A refusal is the decision to answer with.
    async fn outgoing_fields(
        &mut self,
        draft: &mut Draft,
        queue_id: Option<MsgId>,
    ) -> Result<(), Decision> {
        let runtime = &self.runtime;
        let dkim = self.ctx.dkim.load_full();
        let login = self.login.as_deref();
        let local = self.local_client.is_some();
        let ours = login.is_some() || local || runtime.is_trusted(self.peer.ip());
        if !ours || (login.is_none() && !local && dkim.is_empty()) {
            return Ok(());
        }
        let content = draft.content().await.map_err(|e| {
            warn!(event = "draft.error", session_id = self.session_id, error = %e);
            Decision::Reject(storage_failure(&e))
        })?;
        let header = submission::header_section(&content);
        let mut added = Vec::new();
        if let Some(login) = login {
            let id = queue_id.map(|id| id.to_string()).unwrap_or_default();
            added = self
                .policy()
                .end_of_data(&self.facts(), login, header, &id)
                .map_err(Decision::Reject)?;
        } else if local {
            let id = queue_id.map(|id| id.to_string()).unwrap_or_default();
            added = submission::missing_fields(header, &runtime.hostname, &id);
        }
        if let Some(domain) = submission::author_domain(header)
            && dkim.signs_for(&domain)
        {
            let content = match as_relayed(&content) {
                Some(folded) => {
                    // A relay would fold the long lines after we signed
                    // them, and the signature would fail at the receiver:
                    // store (and so deliver and relay) the folded form, and
                    // sign that. Called before any prepend, so the new
                    // draft holds all there is.
                    let mut replacement = self.ctx.spool.draft();
                    if let Err(e) = replacement.write(&folded).await {
                        warn!(event = "draft.error", session_id = self.session_id, error = %e);
                        return Err(Decision::Reject(storage_failure(&e)));
                    }
                    *draft = replacement;
                    folded
                }
                None => content,
            };
            let mut message = Vec::with_capacity(added.len() + content.len());
            message.extend_from_slice(&added);
            message.extend_from_slice(&content);
            match dkim.sign_async(&domain, message.into()).await {
                Ok(fields) => {
                    draft.prepend(&added);
                    draft.prepend(&fields);
                    return Ok(());
                }
                // Unsigned mail still goes: a receiver may score it lower,
                // but refusing our own user's mail over our key is worse.
                Err(e) => {
                    warn!(event = "dkim.sign_failed", session_id = self.session_id, domain = %domain, error = %e)
                }
            }
        }
        draft.prepend(&added);
        Ok(())
    }

    /// The users file's egress limits for `user` (read afresh: `tern user
    /// limits` applies to sessions already logged in).
    fn user_limits(&self, user: &str) -> UserLimits {
        self.ctx
            .accounts
            .store()
            .snapshot()
            .get(user)
            .map(|u| u.limits)
            .unwrap_or_default()
    }

    /// The policy hooks of this server.
    fn policy(&self) -> Policy<'_> {
        Policy {
            runtime: &self.runtime,
            egress: &self.ctx.egress,
        }
    }

    /// What policy needs to know about this session.
    fn facts(&self) -> SessionFacts {
        SessionFacts {
            session_id: self.session_id,
            peer: self.peer,
            local_ip: self.local_ip,
            role: self.role,
            tls: self.tls.is_some(),
            user: self.login.as_ref().map(|l| l.name.clone()),
            local: self.local_client.as_deref().cloned(),
        }
    }

    fn abort_message(&mut self, reason: Refusal) {
        if let Some(tx) = self.tx.take() {
            // Content had started (refused by the engine, timed out, cut
            // off): the reserved ID names it in the log, never in the queue.
            if let Some(id) = tx.queue_id {
                self.refused(Some(id), reason);
            }
            drop(tx.draft);
        }
    }

    /// Logs and counts a message that ends without a 250.
    fn refused(&self, queue_id: Option<MsgId>, reason: Refusal) {
        metrics::message_refused(self.session_id, self.peer, queue_id, reason);
    }

    async fn end_of_data(&mut self) -> Decision {
        let Some(tx) = self.tx.take() else {
            return Decision::Reject(Reply::enhanced(503, (5, 5, 1), "Error: need MAIL command"));
        };
        let mut draft = match (tx.draft, tx.draft_error) {
            (Some(draft), None) => draft,
            (_, Some(e)) => {
                self.refused(tx.queue_id, Refusal::storage(&e));
                return Decision::Reject(storage_failure(&e));
            }
            (None, None) => {
                self.refused(tx.queue_id, Refusal::StorageError);
                return Decision::Reject(local_error());
            }
        };
        // A message that is all header section ends inside it.
        let mut rest = Vec::new();
        let mut forged_results = tx.forged_results;
        forged_results.0.finish(&mut rest);
        if !rest.is_empty()
            && let Err(e) = draft.write(&rest).await
        {
            warn!(event = "draft.error", session_id = self.session_id, error = %e);
            self.refused(tx.queue_id, Refusal::storage(&e));
            return Decision::Reject(storage_failure(&e));
        }
        let queue_id = tx.queue_id;
        if let Err(decision) = self.outgoing_fields(&mut draft, queue_id).await {
            // A permanent refusal is the submission rules'; a temporary one
            // is the draft that could not be read back.
            let reason = match &decision {
                Decision::Reject(r) if r.code >= 500 => Refusal::Policy,
                Decision::Reject(r) if r.code == storage_full().code => Refusal::StorageFull,
                _ => Refusal::StorageError,
            };
            self.refused(queue_id, reason);
            return decision;
        }
        draft.prepend(&tx.received);
        let params = tx.params;
        let envelope = Envelope {
            sender: tx.sender,
            recipients: tx.recipients,
            received_at: chrono::Utc::now().timestamp(),
            size: 0,
            smtputf8: params.smtputf8,
            body_type: params.body.map(|b| match b {
                BodyType::SevenBit => "7BIT".to_string(),
                BodyType::EightBitMime => "8BITMIME".to_string(),
                BodyType::BinaryMime => "BINARYMIME".to_string(),
            }),
            ret: params.ret.map(|r| match r {
                Ret::Full => "FULL".to_string(),
                Ret::Hdrs => "HDRS".to_string(),
            }),
            envid: params.envid,
            client_ip: match &self.local_client {
                Some(client) => format!("local uid {}", client.uid),
                None => self.peer.ip().to_string(),
            },
            helo: self.session.helo_domain().unwrap_or("").to_string(),
            auth_user: self.login.as_ref().map(|l| l.name.clone()),
        };
        // What the egress limits count once the message is ours.
        let remote: Vec<String> = envelope
            .recipients
            .iter()
            .filter(|r| r.route == Route::Remote)
            .map(|r| r.address.clone())
            .collect();
        let rcpts = envelope.recipients.len();
        let work = Work::of(&envelope);
        let sender = envelope.sender.clone();
        let committed = match queue_id {
            Some(id) => self.ctx.spool.commit_as(id, envelope, draft).await,
            None => self.ctx.spool.commit(envelope, draft).await,
        };
        match committed {
            Ok(id) => {
                metrics::message_accepted();
                info!(event = "queue.commit", session_id = self.session_id, queue_id = %id, from = %sender, rcpts);
                if let Some(login) = &self.login {
                    self.ctx
                        .egress
                        .committed(&login.name, &remote, crate::outbound::now_millis());
                }
                self.ctx.queue.notify(id, work);
                Decision::Queued {
                    queue_id: id.to_string(),
                }
            }
            Err(e) => {
                self.refused(queue_id, Refusal::spool(&e));
                let queue_id = queue_id.map(|id| id.to_string());
                warn!(event = "queue.commit_failed", session_id = self.session_id, queue_id, error = %e);
                Decision::Reject(match &e {
                    SpoolError::Io(io) => storage_failure(io),
                    _ => local_error(),
                })
            }
        }
    }
}

/// `content` as the SMTP client sends it (lines over 998 octets folded, see
/// `tern_proto::client::ContentEncoder`), or `None` when that is `content`
/// itself: the form a signature must cover to survive our own relaying.
fn as_relayed(content: &[u8]) -> Option<Vec<u8>> {
    // Folding adds a few octets per 998: room for them up front.
    let mut out = Vec::with_capacity(content.len() + content.len() / 256 + 2);
    let mut encoder = tern_proto::client::ContentEncoder::chunked();
    encoder.feed(content, &mut out);
    encoder.finish(&mut out);
    (out != content).then_some(out)
}

/// `452 4.3.1`: the spool's storage is full (RFC 3463 "mail system full").
fn storage_full() -> Reply {
    Reply::enhanced(
        452,
        (4, 3, 1),
        "Error: insufficient system storage, try again later",
    )
}

/// `451 4.3.0`: the spool could not store the message for another reason.
fn local_error() -> Reply {
    Reply::enhanced(
        451,
        (4, 3, 0),
        "Error: local error in processing, try again later",
    )
}

/// The reply for a message the spool could not store. Out of space, out of
/// quota and past the file-size limit (`EFBIG`, `ulimit -f`) are "mail
/// system full", `452 4.3.1`; anything else (`EIO`, a file system turned
/// read-only) is `451 4.3.0`. Always temporary: every one of them is the
/// host's state, which the administrator can fix, not the message's. For
/// `EFBIG` RFC 3463 would also allow `552 5.3.4` ("message too big for
/// system"), but the limit is a process setting, lower than the size we
/// advertise, that the client cannot know of: a bounce would lose a message
/// that the same server takes once the limit is raised, and a segment may
/// hit the limit with a message that fits the next one.
fn storage_failure(e: &io::Error) -> Reply {
    // One classification for the reply, the log and the metrics.
    match Refusal::storage(e) {
        Refusal::StorageFull => storage_full(),
        _ => local_error(),
    }
}

/// The egress limits for one RCPT of an authenticated user: each remote
/// destination not yet in the transaction is checked; local ones never
/// count. A refusal refuses the whole RCPT (an alias expanding to several
/// remote addresses is all or nothing).
fn egress_rcpt(
    egress: &Egress,
    user: &str,
    limits: &UserLimits,
    tx: &mut Transaction,
    destinations: &[(String, Route)],
) -> Result<(), Reply> {
    let now = crate::outbound::now_millis();
    let mut pending = tx
        .recipients
        .iter()
        .filter(|r| r.route == Route::Remote)
        .count() as u32;
    let mut new = tx.new_remote;
    let mut seen = HashSet::new();
    for (address, route) in destinations {
        let key = address.to_lowercase();
        if *route != Route::Remote
            || tx.destinations.contains(&(false, key.clone()))
            || !seen.insert(key)
        {
            continue;
        }
        let verdict = egress.rcpt(user, limits, address, pending, new, now)?;
        pending += 1;
        new += u32::from(verdict.new);
    }
    tx.new_remote = new;
    Ok(())
}

/// "5.7.8" as the triple `Reply::enhanced` takes; a malformed one (never
/// produced by our own tables) becomes the generic 5.0.0 / 4.0.0.
fn enhanced_triple(code: &str) -> (u8, u16, u16) {
    let mut parts = code.split('.').map(|p| p.parse::<u16>().ok());
    match (parts.next(), parts.next(), parts.next()) {
        (Some(Some(a)), Some(Some(b)), Some(Some(c))) => (a as u8, b, c),
        (Some(Some(4)), _, _) => (4, 0, 0),
        _ => (5, 0, 0),
    }
}

fn notify_string(n: &tern_proto::Notify) -> String {
    if n.never {
        return "NEVER".into();
    }
    let mut parts = Vec::new();
    if n.success {
        parts.push("SUCCESS");
    }
    if n.failure {
        parts.push("FAILURE");
    }
    if n.delay {
        parts.push("DELAY");
    }
    parts.join(",")
}

/// The RFC 5321 §4.1.3 address literal of the client.
fn address_literal(peer: SocketAddr) -> String {
    match crate::config::canonical_ip(peer.ip()) {
        std::net::IpAddr::V4(v4) => format!("[{v4}]"),
        std::net::IpAddr::V6(v6) => format!("[IPv6:{v6}]"),
    }
}

/// The trace header of RFC 5321 §4.4, with the RFC 3848 / RFC 6531 §4.3
/// protocol keyword. TCP-info is the address literal of the peer; the HELO
/// name was validated by the protocol engine (a domain or address literal).
/// A TLS session's version and cipher go in a comment, as Postfix writes
/// them, so a reader of the header sees how the hop was protected.
/// `client` is the HELO name and address; `None` leaves the from-clause
/// out (`submission.received_client_address = false`: a user's home address
/// is nobody's business), as large providers do for their own users.
pub fn received_header(
    client: Option<(&str, SocketAddr)>,
    tls: Option<&TlsInfo>,
    hostname: &str,
    protocol: &str,
    queue_id: &str,
    rcpt: Option<&str>,
) -> Vec<u8> {
    let from = match client {
        Some((helo, peer)) => from_clause(helo, peer),
        None => String::new(),
    };
    received_header_from(from, tls, hostname, protocol, queue_id, rcpt)
}

/// The from-clause of a TCP client: its HELO name and address literal.
fn from_clause(helo: &str, peer: SocketAddr) -> String {
    let helo: String = helo
        .chars()
        .filter(|c| !c.is_control() && !"()\\".contains(*c))
        .collect();
    format!("from {helo} ({})", address_literal(peer))
}

/// The from-clause of a local user's program: it has no address, and its
/// HELO name is whatever it likes, so the uid the kernel vouched for is
/// what names it (Postfix writes "from userid N" for the same reason).
fn local_from_clause(uid: u32) -> String {
    format!("from local (uid {uid})")
}

/// [`received_header`] with the from-clause made already (empty: none).
fn received_header_from(
    from: String,
    tls: Option<&TlsInfo>,
    hostname: &str,
    protocol: &str,
    queue_id: &str,
    rcpt: Option<&str>,
) -> Vec<u8> {
    let tls = tls
        .map(|t| format!("(using {} with cipher {})", t.version, t.cipher))
        .unwrap_or_default();
    let head = [from, tls]
        .into_iter()
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join("\r\n\t");
    let by_sep = if head.is_empty() { "" } else { "\r\n\t" };
    // §4.4: Opt-info is [Via] [With] [ID] [For], in that order.
    let mut h =
        format!("Received: {head}{by_sep}by {hostname} (Tern) with {protocol} id {queue_id}");
    if let Some(rcpt) = rcpt {
        h.push_str(&format!("\r\n\tfor <{rcpt}>"));
    }
    h.push_str(&format!(";\r\n\t{}\r\n", chrono::Local::now().to_rfc2822()));
    h.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_failures_are_temporary_and_name_their_cause() {
        let reply = |errno| {
            let r = storage_failure(&io::Error::from_raw_os_error(errno));
            (r.code, r.enhanced.map(|e| e.to_string()))
        };
        for full in [libc::ENOSPC, libc::EDQUOT, libc::EFBIG] {
            assert_eq!(reply(full), (452, Some("4.3.1".into())), "errno {full}");
        }
        for broken in [libc::EIO, libc::EROFS, libc::EACCES] {
            assert_eq!(reply(broken), (451, Some("4.3.0".into())), "errno {broken}");
        }
    }

    #[test]
    fn received_header_follows_rfc5321_4_4() {
        let peer: SocketAddr = "192.0.2.7:40000".parse().unwrap();
        let h = String::from_utf8(received_header(
            Some(("client.test", peer)),
            None,
            "mx.test",
            "ESMTP",
            "0123ABCD",
            Some("a@b.test"),
        ))
        .unwrap();
        assert!(h.starts_with("Received: from client.test ([192.0.2.7])\r\n\tby mx.test (Tern) with ESMTP id 0123ABCD\r\n\tfor <a@b.test>;\r\n\t"), "{h}");
        assert!(h.ends_with("\r\n") && !h[..h.len() - 2].contains("\r\n\r\n"));
        // Every continuation line is folded (starts with white space).
        assert!(
            h.split("\r\n")
                .skip(1)
                .filter(|l| !l.is_empty())
                .all(|l| l.starts_with('\t'))
        );
        let v6: SocketAddr = "[2001:db8::1]:25".parse().unwrap();
        let h = String::from_utf8(received_header(
            Some(("[IPv6:2001:db8::1]", v6)),
            None,
            "mx.test",
            "SMTP",
            "0123ABCD",
            None,
        ))
        .unwrap();
        assert!(h.starts_with("Received: from [IPv6:2001:db8::1] ([IPv6:2001:db8::1])\r\n\tby mx.test (Tern) with SMTP id 0123ABCD;\r\n"), "{h}");
        let mapped: SocketAddr = "[::ffff:192.0.2.9]:25".parse().unwrap();
        assert_eq!(address_literal(mapped), "[192.0.2.9]");
    }

    #[test]
    fn received_header_never_carries_parentheses_or_controls_from_helo() {
        let peer: SocketAddr = "192.0.2.7:40000".parse().unwrap();
        let h = String::from_utf8(received_header(
            Some(("a(b)\\c", peer)),
            None,
            "mx.test",
            "ESMTP",
            "1",
            None,
        ))
        .unwrap();
        assert!(h.starts_with("Received: from abc ([192.0.2.7])"), "{h}");
    }

    #[test]
    fn received_header_can_leave_the_client_out() {
        let h = String::from_utf8(received_header(None, None, "mx.test", "ESMTPSA", "1", None))
            .unwrap();
        assert!(
            h.starts_with("Received: by mx.test (Tern) with ESMTPSA id 1;\r\n"),
            "{h}"
        );
    }

    #[test]
    fn received_header_of_a_local_client_names_its_uid() {
        let h = String::from_utf8(received_header_from(
            local_from_clause(1000),
            None,
            "mx.test",
            "ESMTP",
            "1",
            Some("root@mx.test"),
        ))
        .unwrap();
        assert!(
            h.starts_with("Received: from local (uid 1000)\r\n\tby mx.test (Tern) with ESMTP id 1\r\n\tfor <root@mx.test>;\r\n"),
            "{h}"
        );
    }

    #[test]
    fn received_header_names_the_tls_version_and_cipher() {
        let peer: SocketAddr = "192.0.2.7:40000".parse().unwrap();
        let tls = TlsInfo {
            version: "TLSv1.3".into(),
            cipher: "TLS13_AES_256_GCM_SHA384".into(),
            server_name: None,
            channel_binding: None,
        };
        let h = String::from_utf8(received_header(
            Some(("client.test", peer)),
            Some(&tls),
            "mx.test",
            "ESMTPS",
            "1",
            None,
        ))
        .unwrap();
        assert!(h.starts_with("Received: from client.test ([192.0.2.7])\r\n\t(using TLSv1.3 with cipher TLS13_AES_256_GCM_SHA384)\r\n\tby mx.test (Tern) with ESMTPS id 1;\r\n"), "{h}");
    }

    fn transaction() -> Transaction {
        Transaction {
            sender: "alice@example.test".into(),
            params: MailParams::default(),
            recipients: Vec::new(),
            destinations: HashSet::new(),
            draft: None,
            draft_error: None,
            forged_results: Box::new((ForgedResultsFilter::new("mx.test"), Vec::new())),
            queue_id: None,
            received: Vec::new(),
            new_remote: 0,
        }
    }

    #[test]
    fn egress_counts_only_remote_destinations_once_per_transaction() {
        let egress = Egress::new(
            crate::egress::EgressLimits {
                max_recipients_per_hour: 2,
                breaker_factor: 100,
                ..Default::default()
            },
            Box::new(crate::egress::MemoryCounters::default()),
            None,
            None,
            Vec::new(),
        );
        let limits = UserLimits::default();
        let mut tx = transaction();
        let local = |m: &str| {
            (
                format!("{m}@example.test"),
                Route::Local {
                    mailbox: m.to_string(),
                },
            )
        };
        let remote = |a: &str| (a.to_string(), Route::Remote);
        // An alias reaching two local mailboxes and one remote address: one
        // recipient counts, named twice in the same expansion.
        let alias = [
            local("bob"),
            remote("x@remote.test"),
            local("carol"),
            remote("X@remote.test"),
        ];
        egress_rcpt(&egress, "alice", &limits, &mut tx, &alias).unwrap();
        assert_eq!(tx.new_remote, 1);
        tx.destinations.insert((false, "x@remote.test".into()));
        tx.recipients.push(Recipient {
            address: "x@remote.test".into(),
            original: "team@example.test".into(),
            orcpt: None,
            notify: None,
            route: Route::Remote,
            status: RcptStatus::Pending,
        });
        // Local recipients never reach the limit.
        for _ in 0..10 {
            egress_rcpt(&egress, "alice", &limits, &mut tx, &[local("bob")]).unwrap();
        }
        // Already in the transaction: not counted again.
        egress_rcpt(
            &egress,
            "alice",
            &limits,
            &mut tx,
            &[remote("x@remote.test")],
        )
        .unwrap();
        // The second remote one is the last the limit of 2 allows.
        egress_rcpt(
            &egress,
            "alice",
            &limits,
            &mut tx,
            &[remote("y@remote.test")],
        )
        .unwrap();
        tx.recipients.push(Recipient {
            address: "y@remote.test".into(),
            original: "y@remote.test".into(),
            orcpt: None,
            notify: None,
            route: Route::Remote,
            status: RcptStatus::Pending,
        });
        let refused = egress_rcpt(
            &egress,
            "alice",
            &limits,
            &mut tx,
            &[remote("z@remote.test")],
        )
        .unwrap_err();
        assert_eq!(refused.code, 451);
    }

    #[test]
    fn notify_is_stored_in_rfc3461_form() {
        let n = |never, success, failure, delay| tern_proto::Notify {
            never,
            success,
            failure,
            delay,
        };
        assert_eq!(notify_string(&n(true, false, false, false)), "NEVER");
        assert_eq!(
            notify_string(&n(false, true, true, false)),
            "SUCCESS,FAILURE"
        );
        assert_eq!(notify_string(&n(false, false, false, true)), "DELAY");
    }

    #[test]
    fn signed_content_is_what_a_relay_sends() {
        let plain = b"From: a@ours.test\r\nTo: b@x.test\r\n\r\nhi\r\n";
        assert_eq!(as_relayed(plain), None);
        let mut long = b"From: a@ours.test\r\nTo: ".to_vec();
        for i in 0..150 {
            long.extend_from_slice(format!("user{i}@x.test, ").as_bytes());
        }
        long.extend_from_slice(b"end@x.test\r\n\r\n");
        long.extend(std::iter::repeat_n(b'b', 5000));
        long.extend_from_slice(b"\r\n");
        let folded = as_relayed(&long).expect("long lines are folded");
        assert!(folded.split(|&b| b == b'\n').all(|l| l.len() <= 1000));
        // Already folded: a relay sends it unchanged, so the signature holds.
        assert_eq!(as_relayed(&folded), None);
    }
}
