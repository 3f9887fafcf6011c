//! The server session state machine (RFC 5321 §4.1.4, §4.3, §4.5; RFC 2920
//! PIPELINING; RFC 3030 CHUNKING).
//!
//! The I/O driver feeds bytes with [`Session::receive`], pulls [`Event`]s
//! with [`Session::next_event`] and answers each [`Query`] with
//! [`Session::decide`]. The session answers syntax, sequence and limit
//! errors itself and frames message content (via [`crate::data`]).
//!
//! Invariants:
//! - The first event is `Query(Connect)`; nothing is parsed before the
//!   greeting, and input that arrived before it gets 554 and Close.
//! - Replies are emitted strictly in command order; while a query is
//!   outstanding no further input is processed (it stays buffered).
//! - Only CRLF ends a command line or a content line; a command line is
//!   never longer than `max_command_line` in memory.
//! - After `Close` nothing else is emitted and input is ignored.
//! - Every 4xx/5xx reply counts towards `max_errors`, and every command that
//!   makes no progress towards `max_junk_commands`; an accepted message
//!   starts both counts again. Refused recipients also count towards
//!   `max_rejected_recipients`, which nothing resets (address probing).
//!
//! Not done: I/O, timers (the driver calls [`Session::timeout`]), TLS,
//! AUTH, policy (all via queries), trace headers.
//!
//! Backpressure: input is buffered without limit while a query is
//! outstanding (a pipelining client may legitimately send a whole BDAT chunk
//! then); the driver should stop reading while [`Session::wants_input`] is
//! false.
//!
//! Errors: none returned; protocol errors become replies.

mod commands;
mod decide;

use std::collections::VecDeque;

use crate::address::{ForwardPath, ReversePath};
use crate::command::{MailParams, RcptParams};
use crate::data::{ContentDecoder, ContentLimits};
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
    /// Longest DATA line including CRLF (§4.5.3.1.6: 1000).
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
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            hostname: "localhost".to_string(),
            greeting_text: "ESMTP Tern".to_string(),
            max_command_line: 4096,
            max_text_line: 1000,
            max_message_size: 25 * 1024 * 1024,
            max_recipients: 100,
            max_errors: 20,
            max_rejected_recipients: 100,
            max_junk_commands: 100,
            max_received_headers: 100,
            bare_lf: BareLfPolicy::Reject,
            nul: NulPolicy::Reject,
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
    /// Discard the content streamed so far for this transaction.
    MessageAborted,
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
}

/// One SMTP server session. See the module header.
#[derive(Debug)]
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
        }
    }

    /// Buffers input; may be called at any time (even before the greeting).
    pub fn receive(&mut self, input: &[u8]) {
        if !self.closed {
            self.input.extend_from_slice(input);
        }
    }

    /// The next event, or `None` when more input or a decision is needed,
    /// or the session is closed.
    pub fn next_event(&mut self) -> Option<Event> {
        loop {
            if let Some(e) = self.events.pop_front() {
                return Some(e);
            }
            if self.closed || self.pending.is_some() || !self.step() {
                return None;
            }
        }
    }

    /// Which timeout applies now.
    pub fn phase(&self) -> Phase {
        match self.mode {
            Mode::Command => Phase::Command,
            Mode::Data | Mode::Chunk { .. } | Mode::Discard { .. } => Phase::Data,
        }
    }

    /// True once `Close` has been queued.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// False while a query is outstanding or after Close: the driver should
    /// stop reading then, so buffered input stays bounded.
    pub fn wants_input(&self) -> bool {
        !self.closed && self.pending.is_none()
    }

    /// The peer was idle too long (§4.5.3.2): 421 4.4.2 and Close.
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

    /// Writes `r` then Close, aborting any message in progress.
    fn close_with(&mut self, r: Reply) {
        if self.closed {
            return;
        }
        self.abort_message();
        self.events.push_back(Event::Reply(r));
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
        if self.msg.take().is_some() {
            self.events.push_back(Event::MessageAborted);
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
