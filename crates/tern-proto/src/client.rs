//! The SMTP and LMTP client state machine (RFC 5321, RFC 2033 LMTP; RFC
//! 2920 PIPELINING, RFC 3030 CHUNKING, RFC 3207 STARTTLS, RFC 4954 AUTH,
//! RFC 1870 SIZE, RFC 6152 8BITMIME, RFC 6531 SMTPUTF8, RFC 3461 DSN).
//!
//! One [`Client`] is one connection, which carries any number of messages
//! in turn. The driver connects, then loops: it feeds what the server sends
//! to [`Client::receive`], takes [`Event`]s from [`Client::next_event`] and
//! acts on them (write bytes, start TLS, record outcomes, close). It hands
//! in a [`Message`] with [`Client::send`] (before or after [`Event::Ready`])
//! and ends with [`Client::quit`]. Time is never read: the driver arms the
//! timeout [`Client::stage`] names and calls [`Client::timeout`] when it
//! expires. The driver writes every `Write` completely, in order, before
//! reading the reply it waits for (it may read meanwhile, but a reply to
//! DATA that arrives before the content was written is treated as broken).
//!
//! Invariants:
//! - Every recipient of every message handed to `send` gets exactly one
//!   outcome, in one [`Event::Outcome`] per message, whatever the server
//!   does (checked by a property test and the `client_session` fuzz target).
//!   Outcome replies are sanitised ([`sanitize`]).
//! - After [`Event::Close`] nothing else is emitted and input is ignored;
//!   no panic on any input; buffered input is bounded (one reply, see
//!   `reader`), and so is content held back (one chunk, `chunk_size`).
//! - With PIPELINING, MAIL and all RCPTs of a transaction go in one write,
//!   followed by the first BDAT chunk when CHUNKING is offered too. DATA is
//!   sent only once every RCPT reply is in: pipelining DATA saves a round
//!   trip but, if every recipient is refused, relies on the server to answer
//!   554 rather than 354 (RFC 2920 §3.1), and a server that gets that wrong
//!   leaves us sending a message to nobody or desynchronised. BDAT has no
//!   such risk (its octets are counted), which is why it is pipelined.
//! - Without PIPELINING, one command at a time.
//! - A transaction carries at most `max_recipients` recipients; those past
//!   it, and those a server refuses with 452 "too many recipients"
//!   (§4.5.3.1.10), go in the next transaction on the same connection.
//!   A transaction that accepted no recipient at all ends that: its 452
//!   recipients are deferred (temporary failure), so it always terminates.
//! - RSET is sent when a transaction ends without its final reply (all
//!   recipients refused, DATA or a chunk refused), never otherwise.
//! - Nothing is sent that the server did not advertise: SIZE, BODY,
//!   SMTPUTF8 and the DSN parameters only with their extension. A message
//!   the server cannot take as it is (too big, UTF-8 envelope without
//!   SMTPUTF8, 8-bit content without 8BITMIME) is failed before sending.
//!   What counts is the content, not the label: a message received with
//!   BODY=8BITMIME whose octets are all 7-bit goes to a 7-bit server as it
//!   is (its conversion to 7 bits is itself, RFC 6152 §3), and SMTPUTF8 is
//!   needed for a UTF-8 envelope, or for a message received with SMTPUTF8
//!   whose header section holds non-ASCII (as Postfix decides).
//! - No bare CR or LF is sent, and over SMTP no line over 998 octets
//!   ([`ContentEncoder`]; over LMTP long lines go whole, into a store).
//! - A reply 421 to anything, or any reply out of sequence, malformed or
//!   unsolicited, ends the connection; recipients without a final outcome
//!   then fail temporarily.
//!
//! Not done: I/O, the TLS handshake and certificate checks (the driver's,
//! on [`Event::StartTls`]), DANE/MTA-STS, routing and retries, streaming a
//! body that is not in memory (the encoder is incremental and content is
//! emitted a chunk at a time, so only `Message::content` would change),
//! AUTH mechanisms other than PLAIN and LOGIN, BINARYMIME, MIME downgrade.
//!
//! Errors: none returned but [`SendError`]; failures are events
//! ([`Event::Failed`], per-recipient outcomes) carrying the server's reply
//! or a [`LocalFailure`] reply.

mod encode;
mod local;
mod reader;
mod setup;
mod transaction;

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use crate::address::{ForwardPath, ReversePath};
use crate::command::{MailParams, RcptParams};
use crate::ehlo::Capabilities;
use crate::reply::Reply;

pub use encode::{ContentEncoder, MAX_TEXT_LINE};
pub use local::{LocalFailure, MAX_OUTCOME_LINES, MAX_OUTCOME_TEXT, sanitize};
pub use reader::{MAX_REPLY_BYTES, MAX_REPLY_LINES};

use reader::{Read, ReplyReader};
use transaction::Run;

/// Which protocol the server speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    #[default]
    Smtp,
    /// RFC 2033: LHLO, no HELO fallback, one reply per accepted recipient
    /// after the content.
    Lmtp,
}

/// Whether to use STARTTLS on this connection (certificate checks are the
/// driver's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsPolicy {
    /// Never send STARTTLS.
    None,
    /// STARTTLS when offered; if the server refuses it, go on in plain text
    /// (reported with [`Event::TlsDeclined`]).
    #[default]
    Opportunistic,
    /// STARTTLS or nothing: the connection fails temporarily when it is not
    /// offered or refused.
    Require,
}

/// Smarthost credentials for AUTH PLAIN (preferred) or LOGIN.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    /// Never prints the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// Per-connection settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    pub protocol: Protocol,
    /// Our name in EHLO/HELO/LHLO: a domain or an address literal.
    pub helo_name: String,
    pub tls: TlsPolicy,
    /// AUTH after TLS (or before, with `auth_without_tls`); the connection
    /// fails when the server offers neither PLAIN nor LOGIN.
    pub credentials: Option<Credentials>,
    /// Send credentials over a connection without TLS.
    pub auth_without_tls: bool,
    /// Recipients per transaction; 0 = no limit of ours.
    pub max_recipients: usize,
    /// Content octets per BDAT chunk and per write of DATA content.
    pub chunk_size: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            protocol: Protocol::Smtp,
            helo_name: "localhost".into(),
            tls: TlsPolicy::Opportunistic,
            credentials: None,
            auth_without_tls: false,
            max_recipients: 100,
            chunk_size: 256 * 1024,
        }
    }
}

/// One recipient and its DSN parameters (sent only when the server
/// advertises DSN).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipient {
    pub to: ForwardPath,
    pub params: RcptParams,
}

/// A message to send: the envelope and the content as the spool stores it
/// (unstuffed, CRLF line ends).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub from: ReversePath,
    /// `size` is ignored (the content's length is declared); `body` and
    /// `smtputf8` say how the message was received: SMTPUTF8 is then needed
    /// if the header section holds non-ASCII; `ret` and `envid` are passed
    /// on under DSN.
    pub params: MailParams,
    pub recipients: Vec<Recipient>,
    /// `Bytes`: the spool's buffer is shared, not copied (100 KiB a message).
    pub content: bytes::Bytes,
}

/// Where a recipient ended up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// The server took responsibility (2xx after the content).
    Delivered,
    /// Try again later.
    Temporary,
    /// Do not try again: bounce.
    Permanent,
}

/// The outcome for one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipientOutcome {
    /// Normally the reply's class; temporary whatever the code for a
    /// refused AUTH (a credentials fix should not bounce mail).
    pub status: Status,
    /// The server's reply (sanitised), or ours when `local`.
    pub reply: Reply,
    /// The reply is a [`LocalFailure`], not the server's.
    pub local: bool,
}

/// All outcomes of one message, in the order of `Message::recipients`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageOutcome {
    pub recipients: Vec<RecipientOutcome>,
    /// The server advertised DSN, so NOTIFY/ORCPT/RET/ENVID were passed on;
    /// when false a NOTIFY=SUCCESS sender is owed a "relayed" DSN (RFC 3461
    /// §4.1).
    pub dsn: bool,
}

/// Why the connection is over, before or between messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionFailure {
    /// The server's reply (sanitised), or ours when `local`.
    pub reply: Reply,
    pub local: bool,
}

impl ConnectionFailure {
    /// A 5xx: this server will not take mail from us (e.g. a 554 greeting).
    pub fn is_permanent(&self) -> bool {
        self.reply.is_permanent()
    }
}

/// Output of the client, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Write these octets to the server.
    Write(Vec<u8>),
    /// Do the TLS handshake now (after writing everything before this),
    /// then call `tls_established` or `tls_failed`.
    StartTls,
    /// Opportunistic STARTTLS was refused with this reply; the session goes
    /// on in plain text.
    TlsDeclined(Reply),
    /// The connection can take a message (`send`) or be ended (`quit`).
    Ready,
    /// Every recipient of the message handed to `send` has its outcome.
    Outcome(MessageOutcome),
    /// The connection failed; `Close` follows.
    Failed(ConnectionFailure),
    /// Close the connection after writing everything before this.
    Close,
}

/// Which timeout of RFC 5321 §4.5.3.2 applies to the reply awaited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The 220 greeting: 5 minutes.
    Greeting,
    /// EHLO, STARTTLS, AUTH, RSET, QUIT: 5 minutes.
    Command,
    /// MAIL: 5 minutes.
    Mail,
    /// RCPT: 5 minutes.
    Rcpt,
    /// The 354 to DATA: 2 minutes.
    DataInit,
    /// A BDAT chunk's reply; also the limit for each write of content: 3
    /// minutes.
    DataBlock,
    /// The reply after the content: 10 minutes.
    DataEnd,
}

impl Stage {
    /// The RFC 5321 §4.5.3.2 minimum.
    pub fn timeout(self) -> Duration {
        let minutes = match self {
            Stage::Greeting | Stage::Command | Stage::Mail | Stage::Rcpt => 5,
            Stage::DataInit => 2,
            Stage::DataBlock => 3,
            Stage::DataEnd => 10,
        };
        Duration::from_secs(minutes * 60)
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Greeting => "greeting",
            Stage::Command => "command",
            Stage::Mail => "MAIL",
            Stage::Rcpt => "RCPT",
            Stage::DataInit => "DATA",
            Stage::DataBlock => "data block",
            Stage::DataEnd => "end of data",
        })
    }
}

/// Why `send` did not take a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// A message is already in progress, or `quit` was called.
    Busy,
    /// The connection is closed.
    Closed,
}

/// A reply the client waits for, oldest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Greeting,
    Ehlo,
    Helo,
    StartTls,
    /// 334 asking for the LOGIN user name.
    AuthUser,
    /// 334 asking for the LOGIN password.
    AuthPassword,
    /// 235 to AUTH.
    AuthDone,
    Mail,
    Rcpt(usize),
    /// 354 to DATA.
    Data,
    /// The reply to a BDAT chunk that is not the last.
    Chunk,
    /// The (first) reply after the content: to the final dot or BDAT LAST.
    Final,
    /// LMTP: the reply for this accepted recipient after the first.
    FinalFor(usize),
    Rset,
    Quit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Greeting, EHLO, STARTTLS, AUTH.
    Setup,
    /// Waiting for the driver's TLS handshake.
    Handshake,
    /// Set up, no message in progress.
    Idle,
    /// A message in progress (including its RSET).
    Busy,
    Quitting,
    Closed,
}

/// One client connection. See the module header.
#[derive(Debug)]
pub struct Client {
    config: ClientConfig,
    reader: ReplyReader,
    expect: VecDeque<Expect>,
    events: VecDeque<Event>,
    phase: Phase,
    caps: Capabilities,
    esmtp: bool,
    tls: bool,
    authenticated: bool,
    /// The message handed to `send`, until its outcome.
    run: Option<Run>,
    quit_requested: bool,
    /// `StartTls` is due once the input that carried the 220 is known to
    /// end there.
    announce_tls: bool,
}

impl Client {
    /// A client for a connection just opened; it waits for the greeting.
    pub fn new(config: ClientConfig) -> Client {
        Client {
            config,
            reader: ReplyReader::default(),
            expect: VecDeque::from([Expect::Greeting]),
            events: VecDeque::new(),
            phase: Phase::Setup,
            caps: Capabilities::default(),
            esmtp: false,
            tls: false,
            authenticated: false,
            run: None,
            quit_requested: false,
            announce_tls: false,
        }
    }

    /// Octets from the server.
    pub fn receive(&mut self, input: &[u8]) {
        self.read_replies(input);
        if self.announce_tls && self.phase == Phase::Handshake {
            self.events.push_back(Event::StartTls);
        }
        self.announce_tls = false;
    }

    fn read_replies(&mut self, mut input: &[u8]) {
        while !input.is_empty() && self.phase != Phase::Closed {
            if self.phase == Phase::Handshake {
                // Plain-text octets after the 220 to STARTTLS would be read
                // as if they came through TLS: a response injection.
                self.fail_local(LocalFailure::DataBeforeTls, false);
                return;
            }
            match self.reader.read(input) {
                Read::NeedMore => return,
                Read::Error(what) => {
                    self.fail_local(LocalFailure::MalformedReply(what), false);
                    return;
                }
                Read::Reply(reply, used) => {
                    input = &input[used..];
                    self.on_reply(reply);
                }
            }
        }
    }

    /// The server closed the connection.
    pub fn eof(&mut self) {
        match self.phase {
            Phase::Closed => {}
            Phase::Quitting => self.close(),
            _ => self.fail_local(LocalFailure::ConnectionLost, false),
        }
    }

    /// The timeout for [`Client::stage`] expired (or a write took longer
    /// than `Stage::DataBlock`): what is open fails temporarily, naming the
    /// stage, and the connection closes without QUIT. An idle connection
    /// (no stage) is ended with `quit` instead.
    pub fn timeout(&mut self) {
        match self.phase {
            Phase::Closed => {}
            Phase::Quitting => self.close(),
            _ => {
                let stage = self.stage().unwrap_or(Stage::Command);
                self.fail_local(LocalFailure::Timeout(stage), false);
            }
        }
    }

    /// The TLS handshake after [`Event::StartTls`] succeeded: EHLO again,
    /// capabilities read anew (RFC 3207 §4.2).
    pub fn tls_established(&mut self) {
        if self.phase != Phase::Handshake {
            return;
        }
        self.phase = Phase::Setup;
        self.tls = true;
        self.caps = Capabilities::default();
        self.send_hello();
    }

    /// The TLS handshake failed: the connection is unusable. Under an
    /// opportunistic policy the driver may retry in plain text with
    /// `TlsPolicy::None`.
    pub fn tls_failed(&mut self) {
        if self.phase == Phase::Handshake {
            self.fail_local(LocalFailure::TlsFailed, false);
        }
    }

    /// Hands in a message. It is sent once the connection is set up (at
    /// once if it is); its outcome comes as one [`Event::Outcome`]. A
    /// message handed in before [`Event::Ready`] shares the connection's
    /// fate: a 554 greeting fails its recipients permanently, so a driver
    /// that tries the next MX on such failures waits for `Ready`.
    pub fn send(&mut self, message: Message) -> Result<(), SendError> {
        if self.phase == Phase::Closed {
            return Err(SendError::Closed);
        }
        if self.run.is_some() || self.quit_requested || self.phase == Phase::Quitting {
            return Err(SendError::Busy);
        }
        self.run = Some(Run::new(message));
        if self.phase == Phase::Idle {
            self.start_message();
        }
        Ok(())
    }

    /// Ends the session with QUIT once the message in progress (if any) is
    /// done.
    pub fn quit(&mut self) {
        self.quit_requested = true;
        if self.phase == Phase::Idle && self.run.is_none() {
            self.send_quit();
        }
    }

    /// The next event, or `None` until more input or a call from the driver.
    pub fn next_event(&mut self) -> Option<Event> {
        if self.events.is_empty() {
            self.pump_content();
        }
        self.events.pop_front()
    }

    /// Which reply timeout applies now; `None` when no reply is awaited
    /// (idle between messages: the driver's idle limit applies; or during
    /// the TLS handshake).
    pub fn stage(&self) -> Option<Stage> {
        Some(match self.expect.front()? {
            Expect::Greeting => Stage::Greeting,
            Expect::Mail => Stage::Mail,
            Expect::Rcpt(_) => Stage::Rcpt,
            Expect::Data => Stage::DataInit,
            Expect::Chunk => Stage::DataBlock,
            Expect::Final | Expect::FinalFor(_) => Stage::DataEnd,
            _ => Stage::Command,
        })
    }

    /// True when `send` would take a message.
    pub fn can_send(&self) -> bool {
        !matches!(self.phase, Phase::Closed | Phase::Quitting)
            && self.run.is_none()
            && !self.quit_requested
    }

    /// True once `Close` has been queued.
    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// The server's extensions from its last EHLO/LHLO reply (empty after
    /// HELO).
    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    /// True when the server answered EHLO/LHLO (not HELO).
    pub fn is_esmtp(&self) -> bool {
        self.esmtp
    }

    /// True after `tls_established`.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// True after a successful AUTH.
    pub fn is_authenticated(&self) -> bool {
        self.authenticated
    }

    fn on_reply(&mut self, reply: Reply) {
        let Some(expect) = self.expect.pop_front() else {
            // §3.8: a server may announce it is closing at any time.
            if reply.code == 421 {
                self.fail_server(reply, Status::Temporary, false);
            } else {
                self.fail_local(LocalFailure::OutOfSequence, false);
            }
            return;
        };
        if expect == Expect::Quit {
            self.close();
            return;
        }
        if reply.code == 421 {
            // §3.8: the server is closing the connection, whatever it was asked.
            self.fail_server(reply, Status::Temporary, false);
            return;
        }
        match expect {
            Expect::Greeting => self.on_greeting(reply),
            Expect::Ehlo => self.on_ehlo(reply),
            Expect::Helo => self.on_helo(reply),
            Expect::StartTls => self.on_starttls(reply),
            Expect::AuthUser | Expect::AuthPassword | Expect::AuthDone => {
                self.on_auth(expect, reply)
            }
            Expect::Rset => self.on_rset(reply),
            _ => self.on_transaction_reply(expect, reply),
        }
    }

    fn on_rset(&mut self, reply: Reply) {
        if reply.code / 100 == 2 {
            self.next_transaction();
        } else {
            self.fail_local(LocalFailure::RsetRefused, true);
        }
    }

    /// Set up (or between messages): start the waiting message, or QUIT,
    /// or tell the driver.
    fn ready(&mut self) {
        self.phase = Phase::Idle;
        if self.run.is_some() {
            self.start_message();
        } else if self.quit_requested {
            self.send_quit();
        } else {
            self.events.push_back(Event::Ready);
        }
    }

    fn send_quit(&mut self) {
        self.write_command("QUIT".into(), Expect::Quit);
        self.phase = Phase::Quitting;
    }

    fn write_command(&mut self, line: String, expect: Expect) {
        let mut bytes = line.into_bytes();
        bytes.extend_from_slice(b"\r\n");
        self.events.push_back(Event::Write(bytes));
        self.expect.push_back(expect);
    }

    fn fail_local(&mut self, failure: LocalFailure, polite: bool) {
        let reply = failure.reply();
        let status = status_of(&reply);
        self.fail(reply, true, status, polite);
    }

    fn fail_server(&mut self, reply: Reply, status: Status, polite: bool) {
        self.fail(sanitize(&reply), false, status, polite);
    }

    /// Ends the connection: recipients without an outcome get `reply`,
    /// then `Failed`, QUIT when the protocol is still in step (`polite`),
    /// and `Close`.
    fn fail(&mut self, reply: Reply, local: bool, status: Status, polite: bool) {
        match self.phase {
            Phase::Closed => return,
            // We were leaving anyway; whatever the server does now is moot.
            Phase::Quitting => {
                self.close();
                return;
            }
            _ => {}
        }
        if let Some(mut run) = self.run.take() {
            run.finish_all(status, &reply, local);
            let outcome = run.into_outcome();
            self.events.push_back(Event::Outcome(outcome));
        }
        self.events
            .push_back(Event::Failed(ConnectionFailure { reply, local }));
        if polite {
            self.events.push_back(Event::Write(b"QUIT\r\n".to_vec()));
        }
        self.close();
    }

    fn close(&mut self) {
        self.events.push_back(Event::Close);
        self.phase = Phase::Closed;
        self.expect.clear();
        self.reader = ReplyReader::default();
    }
}

/// A reply's class as a status (2xx delivered, 5xx permanent, else temporary).
fn status_of(reply: &Reply) -> Status {
    match reply.code / 100 {
        2 => Status::Delivered,
        5 => Status::Permanent,
        _ => Status::Temporary,
    }
}

/// True when `s` can go in a command line: no control characters (a CR or
/// LF would end the command and start another: command injection).
fn command_safe(s: &str) -> bool {
    !s.chars().any(char::is_control)
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_hostile;
#[cfg(test)]
mod tests_roundtrip;
#[cfg(test)]
mod tests_tx;
