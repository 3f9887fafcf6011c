//! The server session state machine (RFC 5321 §4.1.4, §4.3, §4.5; RFC 2920
//! PIPELINING; RFC 3030 CHUNKING; RFC 3207 STARTTLS; RFC 4954 AUTH; RFC 6409
//! submission's "AUTH before MAIL").
//!
//! The I/O driver feeds bytes with [`Session::receive`], pulls [`Event`]s
//! with [`Session::next_event`] and answers each [`Query`] with
//! [`Session::decide`]. The session answers syntax, sequence and limit
//! errors itself and frames message content (via [`crate::data`]).
//!
//! TLS: on [`Event::StartTls`] the driver writes the replies before it,
//! runs the handshake and calls [`Session::tls_established`] or
//! [`Session::tls_failed`]; a session on an implicit-TLS port (RFC 8314) is
//! made with [`Session::over_tls`]. AUTH: the session does the SMTP side of
//! RFC 4954 (which commands may start an exchange, the 334 lines, base64,
//! `*`, line lengths); the driver runs the SASL mechanism behind
//! [`Query::Auth`] and [`Query::AuthResponse`] and answers each with
//! [`Decision::AuthChallenge`], `Accept` (235, authenticated) or `Reject`.
//!
//! Invariants:
//! - The first event is `Query(Connect)`; nothing is parsed before the
//!   greeting, and input that arrived before it gets 554 and Close.
//! - Replies are emitted strictly in command order; while a query is
//!   outstanding no further input is processed (it stays buffered).
//! - Only CRLF ends a command line or a content line; a command line is
//!   never longer than `max_command_line` in memory (an AUTH line or a SASL
//!   response: 12288 octets, RFC 4954 §4).
//! - After `Close` nothing else is emitted and input is ignored.
//! - Nothing that arrived after a STARTTLS line is ever processed: the rest
//!   of that input is dropped with the 220, and so is anything received
//!   before `tls_established` (CVE-2011-0411: commands injected in plain
//!   text must not run as if they came through TLS). The handshake gives a
//!   fresh session (no HELO, no transaction, not authenticated); the error
//!   and junk counts go on.
//! - A SASL response is never part of a reply, an event other than
//!   `Query::AuthResponse`, or `Debug` output (see [`SaslData`]).
//! - Every 4xx/5xx reply counts towards `max_errors`, and every command that
//!   makes no progress towards `max_junk_commands`; an accepted message
//!   starts both counts again. Refused recipients also count towards
//!   `max_rejected_recipients`, which nothing resets (address probing).
//!
//! Not done: I/O, timers (the driver calls [`Session::timeout`]), the TLS
//! handshake and SASL mechanisms (the driver's), policy (all via queries),
//! trace headers (the getters for them are here: [`Session::is_tls`],
//! [`Session::is_authenticated`], [`Session::received_protocol`]).
//!
//! Backpressure: input is buffered without limit while a query is
//! outstanding (a pipelining client may legitimately send a whole BDAT chunk
//! then); the driver should stop reading while [`Session::wants_input`] is
//! false.
//!
//! Errors: none returned; protocol errors become replies.

mod auth;
mod commands;
mod decide;

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;

use crate::address::{ForwardPath, ReversePath};
/// In queries; see [`SaslData`].
pub use crate::command::SaslData;
use crate::command::{MailParams, RcptParams};
use crate::data::{ContentDecoder, ContentError, ContentLimits};
use crate::reply::{EnhancedCode, Reply};

/// What to do with a bare LF or bare CR inside message content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BareLfPolicy {
    /// Read the message to its real end, then refuse it with 550 5.5.2.
    #[default]
    Reject,
    /// Turn each bare LF or CR into CRLF in the emitted body.
    Normalize,
}

/// What to do with a NUL octet inside message content. RFC 5322 text and
/// RFC 6152 8BITMIME exclude it, and a downstream server that drops NULs
/// would read `<CRLF>NUL.<CRLF>` as the end of data: relaying NULs is a
/// smuggling risk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NulPolicy {
    /// Read the message to its real end, then refuse it with 550 5.6.0.
    #[default]
    Reject,
    /// Remove every NUL from the emitted body.
    Strip,
}

/// Session configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Used in the greeting, the EHLO reply and 421 replies.
    pub hostname: String,
    /// Text after the hostname in the greeting, e.g. "ESMTP Tern".
    pub greeting_text: String,
    /// Longest command line including CRLF (§4.5.3.1.4 requires ≥ 512).
    pub max_command_line: usize,
    /// Longest content line including CRLF (§4.5.3.1.6 names 1000 as the
    /// least a server must take); 0 = no limit, the default. A longer line
    /// gets 554 5.6.0 after the content. Memory does not depend on it: the
    /// decoder never holds a line (see [`crate::data`]).
    pub max_text_line: usize,
    /// SIZE limit in octets of message content; 0 = unlimited.
    pub max_message_size: u64,
    /// Accepted recipients per transaction (§4.5.3.1.8 requires ≥ 100).
    pub max_recipients: usize,
    /// 4xx/5xx replies before the session gives up, counted since the
    /// last accepted message; 0 = unlimited.
    pub max_errors: usize,
    /// Refused recipients in the whole session before it is closed, never
    /// forgiven: an accepted message (to postmaster, say) between probes
    /// resets `max_errors` but not this; 0 = unlimited.
    pub max_rejected_recipients: usize,
    /// Commands that make no progress (NOOP, RSET, VRFY, HELP, a repeated
    /// HELO/EHLO, unknown verbs) allowed since the last accepted message;
    /// one more gets 421 4.7.0 and Close. 0 = unlimited.
    pub max_junk_commands: usize,
    /// `Received:` fields allowed in a message (loop detection, §6.3).
    pub max_received_headers: usize,
    pub bare_lf: BareLfPolicy,
    pub nul: NulPolicy,
    /// Offer STARTTLS (RFC 3207) while TLS is not active. Only for a driver
    /// that can run a handshake whenever `Event::StartTls` comes.
    pub starttls: bool,
    /// SASL mechanisms offered with AUTH (RFC 4954), upper-case names as
    /// advertised ("PLAIN", "LOGIN", "SCRAM-SHA-256", "SCRAM-SHA-256-PLUS");
    /// empty: no AUTH (the verb gets 502, as before AUTH existed). Shared,
    /// so each session's copy of the config allocates nothing for it.
    /// Names ending in `-PLUS` (channel binding) are offered over TLS only.
    pub auth_mechanisms: Arc<[String]>,
    /// Offer AUTH before TLS too (e.g. for loopback clients); otherwise
    /// AUTH waits for TLS and gets 538 5.7.11 before it.
    pub auth_without_tls: bool,
    /// Submission (RFC 6409): MAIL before a successful AUTH gets
    /// `530 5.7.0` (or "Must issue a STARTTLS command first" when AUTH
    /// itself waits for TLS).
    pub require_auth: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            hostname: "localhost".to_string(),
            greeting_text: "ESMTP Tern".to_string(),
            max_command_line: 4096,
            max_text_line: 0,
            max_message_size: 25 * 1024 * 1024,
            max_recipients: 100,
            max_errors: 20,
            max_rejected_recipients: 100,
            max_junk_commands: 100,
            max_received_headers: 100,
            bare_lf: BareLfPolicy::Reject,
            nul: NulPolicy::Reject,
            starttls: false,
            // The empty slice's default is a shared static: no allocation
            // per session for listeners without AUTH.
            auth_mechanisms: Arc::default(),
            auth_without_tls: false,
            require_auth: false,
        }
    }
}

/// A question for the driver (policy). The session waits for `decide`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Query {
    /// Always the first event.
    Connect,
    Helo {
        domain: String,
        extended: bool,
    },
    Mail {
        from: ReversePath,
        params: MailParams,
    },
    Rcpt {
        to: ForwardPath,
        params: RcptParams,
    },
    /// On DATA, and on the first BDAT of a transaction.
    Data,
    /// The whole message arrived and passed every check.
    EndOfData,
    /// `AUTH` with a mechanism we offer, at a point where AUTH may run
    /// (RFC 4954 §4). Starts a new SASL exchange: the driver drops any
    /// state of an earlier one (an exchange the session ended itself, on
    /// `*`, bad base64 or an over-long line, gets no query of its own).
    Auth {
        /// Upper-case, one of `ServerConfig::auth_mechanisms`.
        mechanism: String,
        /// The decoded initial response; `Some` and empty for `=`, `None`
        /// when the client sent none (a client-first mechanism then gets
        /// an empty challenge from the driver, RFC 4422 §5).
        initial: Option<SaslData>,
    },
    /// The client's decoded answer to the last `Decision::AuthChallenge`.
    AuthResponse(SaslData),
}

/// The driver's answer to a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The session writes its standard positive reply.
    Accept,
    /// Positive, with this reply instead of the standard one.
    AcceptWith(Reply),
    /// 4xx/5xx; the state stays as RFC 5321 says (a refused RCPT is not
    /// added; a refused DATA/BDAT ends the transaction).
    Reject(Reply),
    /// Write this reply, then close.
    Disconnect(Reply),
    /// For `EndOfData`: "250 2.0.0 Ok: queued as <id>". Elsewhere: Accept.
    Queued { queue_id: String },
    /// For `Auth` and `AuthResponse`: send this challenge (`334` and its
    /// base64; `334 ` alone when empty) and read the client's response,
    /// which comes back as `Query::AuthResponse`. To any other query it is
    /// a driver error and refused with 451 4.3.0 (never taken as Accept).
    ///
    /// For `Auth`/`AuthResponse`, `Accept` means the client authenticated
    /// (235 2.7.0, [`Session::is_authenticated`]); `Reject` ends the
    /// exchange with the driver's reply (535 5.7.8, 454 4.7.0, 534 5.7.9,
    /// 432 4.7.12, 501 5.7.0...).
    AuthChallenge(Vec<u8>),
}

/// Output of the session, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Write to the peer.
    Reply(Reply),
    /// Answer with `decide`; no input is processed until then.
    Query(Query),
    /// Message content of the current transaction (dot-unstuffed, CRLF
    /// line ends), in order.
    Body(Vec<u8>),
    /// Discard the content streamed so far for this transaction; with the
    /// rule the content broke, when that is why (its reply follows), or
    /// `None` when it was cut off (end of input, timeout, RSET between
    /// chunks, the session closing).
    MessageAborted(Option<ContentError>),
    /// A message refused before any of its content was read, for a rule of
    /// its content: a MAIL whose SIZE is over the limit (RFC 1870 §6.2), a
    /// first BDAT chunk over it. Its reply follows; the transaction, if
    /// any, is over.
    MessageRefused(ContentError),
    /// Write everything before this (the 220), then run the TLS handshake
    /// and call `tls_established` or `tls_failed`. Until then the session
    /// takes no input (`wants_input` is false). Octets already read from
    /// the connection were sent before the client saw the 220: plain text
    /// to drop, never to hand to the TLS library (`receive` drops them).
    StartTls,
    /// Close the connection after writing everything before it.
    Close,
}

/// Which timeout of RFC 5321 §4.5.3.2 applies right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for a command (5 minutes).
    Command,
    /// Inside message content (3 minutes per data block).
    Data,
}

/// The current mail transaction (§3.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    pub from: ReversePath,
    pub params: MailParams,
    /// Accepted recipients, in order.
    pub rcpts: Vec<(ForwardPath, RcptParams)>,
}

/// The outstanding query, with what `decide` needs to apply it.
#[derive(Debug)]
enum Pending {
    Connect,
    Helo { domain: String, extended: bool },
    Mail(ReversePath, MailParams),
    Rcpt(ForwardPath, RcptParams),
    Data,
    BdatData { size: u64, last: bool },
    EndOfData,
    Auth, // or AuthResponse
}

/// How input is being read right now.
#[derive(Debug)]
enum Mode {
    /// Command lines.
    Command,
    /// DATA content until CRLF.CRLF; the decoder is in `Session::msg`.
    Data,
    /// BDAT chunk octets still to read.
    Chunk {
        remaining: u64,
        size: u64,
        last: bool,
    },
    /// Octets of a refused BDAT to swallow, then `reply` (and reset).
    Discard { remaining: u64, reply: Reply },
    /// The client's line after a 334 challenge (RFC 4954 §4).
    AuthResponse,
}

/// Where the session is with TLS (RFC 3207).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tls {
    Plain,
    /// STARTTLS was accepted: waiting for the driver's handshake.
    Starting,
    Active,
}

/// One SMTP server session. See the module header.
pub struct Session {
    config: ServerConfig,
    /// Unprocessed input; bounded by one command line except while a query
    /// is outstanding (see `wants_input`).
    input: Vec<u8>,
    events: VecDeque<Event>,
    pending: Option<Pending>,
    mode: Mode,
    /// Close has been queued: ignore input, emit nothing more.
    closed: bool,
    helo: Option<String>,
    esmtp: bool,
    tx: Option<Transaction>,
    /// Content state once Query(Data) was accepted, until the message ends.
    msg: Option<ContentDecoder>,
    errors: usize,
    /// Recipients the driver refused in this session.
    rejected_recipients: usize,
    /// Commands that made no progress since the last accepted message.
    junk_commands: usize,
    /// The first command line has started (its first octet was not binary).
    seen_command: bool,
    /// Discarding an over-long command line up to its CRLF.
    skipping_line: bool,
    /// While skipping: the last discarded byte was CR.
    skip_prev_cr: bool,
    /// The command line in progress (up to its CRLF) already had a bare LF:
    /// every piece of it is refused, none runs.
    line_tainted: bool,
    tls: Tls,
    /// A SASL exchange succeeded (RFC 4954: once per session, forgotten by
    /// a TLS handshake).
    /// The TLS channel can be bound to (RFC 9266 tls-exporter needs TLS
    /// 1.3): `-PLUS` mechanisms are offered only then. The driver says so
    /// with `set_channel_binding` after the handshake.
    channel_binding: bool,
    authenticated: bool,
}

/// By hand, so the unprocessed input (which may hold an AUTH line) is never
/// printed: only its length.
impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("config", &self.config)
            .field("input_len", &self.input.len())
            .field("events", &self.events)
            .field("pending", &self.pending)
            .field("mode", &self.mode)
            .field("closed", &self.closed)
            .field("helo", &self.helo)
            .field("esmtp", &self.esmtp)
            .field("tx", &self.tx)
            .field("msg", &self.msg)
            .field("errors", &self.errors)
            .field("rejected_recipients", &self.rejected_recipients)
            .field("junk_commands", &self.junk_commands)
            .field("tls", &self.tls)
            .field("authenticated", &self.authenticated)
            .finish_non_exhaustive()
    }
}

/// Input buffers above this capacity are shrunk once drained, so an idle
/// session stays small after one big line or chunk.
const KEEP_CAPACITY: usize = 8 * 1024;

impl Session {
    /// A new session; the first `next_event` is `Query(Connect)`.
    pub fn new(config: ServerConfig) -> Session {
        let mut events = VecDeque::new();
        events.push_back(Event::Query(Query::Connect));
        Session {
            config,
            input: Vec::new(),
            events,
            pending: Some(Pending::Connect),
            mode: Mode::Command,
            closed: false,
            helo: None,
            esmtp: false,
            tx: None,
            msg: None,
            errors: 0,
            rejected_recipients: 0,
            junk_commands: 0,
            seen_command: false,
            skipping_line: false,
            skip_prev_cr: false,
            line_tainted: false,
            tls: Tls::Plain,
            authenticated: false,
            channel_binding: true,
        }
    }

    /// A session on an implicit-TLS port (RFC 8314 §3.3, e.g. submissions
    /// on 465): the driver completed the handshake before this call, so TLS
    /// is active from the greeting on and STARTTLS is never offered.
    pub fn over_tls(config: ServerConfig) -> Session {
        let mut s = Session::new(config);
        s.tls = Tls::Active;
        s
    }

    /// Buffers input; may be called at any time (even before the greeting).
    /// Dropped after Close, and between STARTTLS and the end of the
    /// handshake (plain text that must never run, see `Event::StartTls`).
    pub fn receive(&mut self, input: &[u8]) {
        if !self.closed && self.tls != Tls::Starting {
            self.input.extend_from_slice(input);
        }
    }

    /// The TLS handshake after [`Event::StartTls`] succeeded. The session
    /// starts again as after the greeting (RFC 3207 §4.2): no HELO/EHLO,
    /// no transaction, not authenticated, nothing buffered; the client
    /// must send EHLO, whose reply no longer offers STARTTLS. Ignored at
    /// any other time.
    pub fn tls_established(&mut self) {
        if self.tls != Tls::Starting {
            return;
        }
        self.tls = Tls::Active;
        self.reset_transaction();
        self.helo = None;
        self.esmtp = false;
        self.authenticated = false;
        self.input = Vec::new();
        self.mode = Mode::Command;
        self.seen_command = false;
        self.skipping_line = false;
        self.skip_prev_cr = false;
        self.line_tainted = false;
    }

    /// Whether this session's TLS channel supports channel binding; without
    /// it `-PLUS` mechanisms are neither offered nor accepted (`504`).
    pub fn set_channel_binding(&mut self, available: bool) {
        self.channel_binding = available;
    }

    /// The TLS handshake after [`Event::StartTls`] failed: the channel is
    /// unusable (no reply can be written in either form), so the session
    /// closes without one. Ignored at any other time.
    pub fn tls_failed(&mut self) {
        if self.tls != Tls::Starting {
            return;
        }
        self.tls = Tls::Plain;
        self.events.push_back(Event::Close);
        self.finish_close();
    }

    /// The next event, or `None` when more input or a decision is needed,
    /// or the session is closed.
    pub fn next_event(&mut self) -> Option<Event> {
        loop {
            if let Some(e) = self.events.pop_front() {
                return Some(e);
            }
            if self.closed || self.pending.is_some() || self.tls == Tls::Starting || !self.step() {
                return None;
            }
        }
    }

    /// Which timeout applies now.
    pub fn phase(&self) -> Phase {
        match self.mode {
            Mode::Command | Mode::AuthResponse => Phase::Command,
            Mode::Data | Mode::Chunk { .. } | Mode::Discard { .. } => Phase::Data,
        }
    }

    /// True once `Close` has been queued.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// False while a query is outstanding, during a TLS handshake and after
    /// Close: the driver should stop reading then, so buffered input stays
    /// bounded.
    pub fn wants_input(&self) -> bool {
        !self.closed && self.pending.is_none() && self.tls != Tls::Starting
    }

    /// The peer was idle too long (§4.5.3.2): 421 4.4.2 and Close (without
    /// the reply during a TLS handshake, see `close_with`).
    pub fn timeout(&mut self) {
        let text = format!("{} Error: timeout exceeded", self.config.hostname);
        self.close_with(Reply::new(421, Some(EnhancedCode(4, 4, 2)), text));
    }

    /// The server is stopping: 421 4.3.2 and Close.
    pub fn shutdown(&mut self) {
        let text = format!("{} Service shutting down", self.config.hostname);
        self.close_with(Reply::new(421, Some(EnhancedCode(4, 3, 2)), text));
    }

    /// The peer closed its side: abort any message and Close.
    pub fn eof(&mut self) {
        if self.closed {
            return;
        }
        self.abort_message();
        self.events.push_back(Event::Close);
        self.finish_close();
    }

    /// The current transaction: MAIL FROM, its parameters, accepted RCPTs.
    pub fn transaction(&self) -> Option<&Transaction> {
        self.tx.as_ref()
    }

    /// The HELO/EHLO argument once accepted.
    pub fn helo_domain(&self) -> Option<&str> {
        self.helo.as_deref()
    }

    /// True when the accepted greeting was EHLO.
    pub fn used_esmtp(&self) -> bool {
        self.esmtp
    }

    /// True once TLS is active: after `tls_established`, or from the start
    /// for `over_tls`.
    pub fn is_tls(&self) -> bool {
        self.tls == Tls::Active
    }

    /// True after a successful AUTH (until a TLS handshake, which forgets
    /// it). Who authenticated is the driver's to remember.
    pub fn is_authenticated(&self) -> bool {
        self.authenticated
    }

    /// The `with` protocol of a `Received:` field (RFC 5321 §4.4) for a
    /// message received now: `SMTP` after HELO; after EHLO `ESMTP` plus `S`
    /// over TLS and `A` when authenticated (RFC 3848), or the `UTF8SMTP`
    /// forms for an SMTPUTF8 transaction (RFC 6531 §3.7.4.2).
    pub fn received_protocol(&self, smtputf8: bool) -> &'static str {
        if !self.esmtp {
            return "SMTP";
        }
        match (smtputf8, self.is_tls(), self.authenticated) {
            (false, false, false) => "ESMTP",
            (false, false, true) => "ESMTPA",
            (false, true, false) => "ESMTPS",
            (false, true, true) => "ESMTPSA",
            (true, false, false) => "UTF8SMTP",
            (true, false, true) => "UTF8SMTPA",
            (true, true, false) => "UTF8SMTPS",
            (true, true, true) => "UTF8SMTPSA",
        }
    }

    fn limits(&self) -> ContentLimits {
        ContentLimits {
            max_size: self.config.max_message_size,
            max_line: self.config.max_text_line,
            max_received: self.config.max_received_headers,
            bare_lf: self.config.bare_lf,
            nul: self.config.nul,
        }
    }

    /// Queues a reply; 4xx/5xx count as errors and the last allowed one
    /// is followed by 421 4.7.0 and Close.
    fn reply(&mut self, r: Reply) {
        // "Too many recipients" is not a client error: RFC 5321 §4.5.3.1.10
        // expects the client to send the rest in another transaction, and a
        // pipelining client may send many RCPTs past the limit at once.
        let overshoot = r.code == 452 && r.enhanced == Some(EnhancedCode(4, 5, 3));
        let is_error = r.code >= 400 && !overshoot;
        self.events.push_back(Event::Reply(r));
        if is_error && !self.closed {
            self.errors += 1;
            if self.config.max_errors != 0 && self.errors >= self.config.max_errors {
                let text = format!("{} Error: too many errors", self.config.hostname);
                self.close_with(Reply::new(421, Some(EnhancedCode(4, 7, 0)), text));
            }
        }
    }

    /// Writes `r` then Close, aborting any message in progress. During a
    /// TLS handshake the reply is dropped: it could go neither in plain
    /// text (the client now speaks TLS) nor through TLS (not set up).
    fn close_with(&mut self, r: Reply) {
        if self.closed {
            return;
        }
        self.abort_message();
        if self.tls != Tls::Starting {
            self.events.push_back(Event::Reply(r));
        }
        self.events.push_back(Event::Close);
        self.finish_close();
    }

    fn finish_close(&mut self) {
        self.closed = true;
        self.pending = None;
        self.mode = Mode::Command;
        self.input = Vec::new();
    }

    /// Drops streamed content, telling the driver (MessageAborted).
    fn abort_message(&mut self) {
        if let Some(msg) = self.msg.take() {
            self.events.push_back(Event::MessageAborted(msg.error()));
        }
    }

    /// Ends the transaction (§4.1.1.5 RSET, §4.1.4 EHLO, after DATA).
    fn reset_transaction(&mut self) {
        self.abort_message();
        self.tx = None;
    }

    fn ask(&mut self, q: Query, p: Pending) {
        self.events.push_back(Event::Query(q));
        self.pending = Some(p);
    }

    /// Drops `n` processed input bytes and gives back memory after a burst.
    fn consume(&mut self, n: usize) {
        self.input.drain(..n);
        if self.input.is_empty() && self.input.capacity() > KEEP_CAPACITY {
            self.input = Vec::new();
        }
    }

    /// Processes some input; false when nothing could be done.
    fn step(&mut self) -> bool {
        match self.mode {
            Mode::Command => self.step_command(),
            Mode::Data => self.step_data(),
            Mode::Chunk { .. } => self.step_chunk(),
            Mode::Discard { .. } => self.step_discard(),
            Mode::AuthResponse => self.step_auth_response(),
        }
    }

    fn step_data(&mut self) -> bool {
        let Some(dec) = self.msg.as_mut() else {
            // Unreachable by construction; recover to command mode.
            self.mode = Mode::Command;
            return true;
        };
        if self.input.is_empty() {
            return false;
        }
        let mut out = Vec::new();
        let (n, done) = dec.feed(&self.input, &mut out);
        self.consume(n);
        if !out.is_empty() {
            self.events.push_back(Event::Body(out));
        }
        if done {
            self.mode = Mode::Command;
            self.end_of_message();
        }
        true
    }

    fn step_chunk(&mut self) -> bool {
        let Mode::Chunk {
            remaining,
            size,
            last,
        } = self.mode
        else {
            return false;
        };
        let Some(dec) = self.msg.as_mut() else {
            self.mode = Mode::Command;
            return true;
        };
        let n = usize::try_from(remaining)
            .unwrap_or(usize::MAX)
            .min(self.input.len());
        if n == 0 && remaining > 0 {
            return false;
        }
        let mut out = Vec::new();
        dec.feed(&self.input[..n], &mut out);
        let remaining = remaining - n as u64;
        if remaining == 0 && last {
            dec.finish(&mut out);
        }
        self.consume(n);
        if !out.is_empty() {
            self.events.push_back(Event::Body(out));
        }
        self.mode = Mode::Chunk {
            remaining,
            size,
            last,
        };
        if remaining == 0 {
            self.mode = Mode::Command;
            self.end_of_chunk(size, last);
        }
        true
    }

    fn step_discard(&mut self) -> bool {
        let Mode::Discard { remaining, .. } = &mut self.mode else {
            return false;
        };
        let n = usize::try_from(*remaining)
            .unwrap_or(usize::MAX)
            .min(self.input.len());
        if n == 0 && *remaining > 0 {
            return false;
        }
        *remaining -= n as u64;
        let done = *remaining == 0;
        self.consume(n);
        if done
            && let Mode::Discard { reply, .. } = std::mem::replace(&mut self.mode, Mode::Command)
        {
            self.reset_transaction();
            self.reply(reply);
        }
        true
    }

    /// A BDAT chunk was read completely (RFC 3030 §2).
    fn end_of_chunk(&mut self, size: u64, last: bool) {
        let error = self.msg.as_ref().and_then(ContentDecoder::error);
        if last || error.is_some() {
            self.end_of_message();
        } else {
            self.reply(Reply::new(
                250,
                Some(EnhancedCode(2, 0, 0)),
                format!("{size} octets received"),
            ));
        }
    }

    /// The content ended (DATA terminator, BDAT LAST, or a bad chunk).
    fn end_of_message(&mut self) {
        let error = self.msg.as_ref().and_then(ContentDecoder::error);
        match error {
            Some(e) => {
                self.reset_transaction();
                self.reply(e.reply());
            }
            None => {
                // From here the driver owns the streamed content: whatever
                // it decides, no MessageAborted follows.
                self.msg = None;
                self.ask(Query::EndOfData, Pending::EndOfData);
            }
        }
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_content;
#[cfg(test)]
mod tests_hardening;
#[cfg(test)]
mod tests_tls_auth;
