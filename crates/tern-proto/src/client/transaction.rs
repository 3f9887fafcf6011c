//! One message on the connection: the checks before it is sent, its
//! transactions (several when recipients are over the limit), per-recipient
//! outcomes, content in DATA or BDAT form, and RSET after a failed one.
//!
//! Invariants: a recipient moves Pending → Sent → (Accepted | Deferred |
//! Done) and ends Done exactly once; Deferred goes back to Pending only when
//! its transaction accepted some recipient, so each transaction finishes at
//! least one recipient and the message always ends. MAIL and RCPT lines are
//! built once, before the first transaction, from the capabilities then
//! known (they do not change while a message is in progress).
//!
//! Not done: lowering the recipient limit after a 452 (each later
//! transaction tries `max_recipients` again; the server refuses the excess
//! cheaply).
//!
//! Errors: none; see `LocalFailure` for what is refused before sending.

use std::collections::VecDeque;

use super::{
    Client, ContentEncoder, Expect, LocalFailure, Message, MessageOutcome, Phase, Protocol,
    RecipientOutcome, Status, command_safe, sanitize, status_of,
};
use crate::command::{BodyType, Orcpt, Ret, xtext_encode};
use crate::ehlo::Capabilities;
use crate::reply::{EnhancedCode, Reply};

#[derive(Debug)]
enum Rcpt {
    Pending,
    Sent,
    /// 452 too many recipients: the next transaction, unless this one made
    /// no progress at all.
    Deferred(Reply),
    Accepted,
    Done(RecipientOutcome),
}

/// The message handed to `send`, until its outcome.
#[derive(Debug)]
pub(super) struct Run {
    message: Message,
    rcpts: Vec<Rcpt>,
    started: bool,
    mail_line: String,
    /// `None` for a recipient that failed the checks.
    rcpt_lines: Vec<Option<String>>,
    dsn: bool,
    tx: Option<Tx>,
}

/// The transaction in progress.
#[derive(Debug)]
struct Tx {
    /// Commands not yet written (without PIPELINING, one goes per reply).
    unsent: VecDeque<(String, Expect)>,
    mail_ok: Option<bool>,
    /// Accepted recipients in RCPT order (the order of LMTP's replies).
    accepted: Vec<usize>,
    chunked: bool,
    pipelined: bool,
    /// Content still to write.
    body: Option<Body>,
    /// Every MAIL/RCPT reply is in and handled.
    settled: bool,
    /// No content reply matters any more (no recipient, or a chunk or DATA
    /// refused): remaining replies are read and dropped.
    abandoned: bool,
    /// The reply after the content came: the server ended the transaction.
    done: bool,
}

#[derive(Debug)]
struct Body {
    encoder: ContentEncoder,
    offset: usize,
}

/// The content encoder for DATA (`dot`) or BDAT. Over LMTP, long lines go
/// as they are: LMTP delivers into the final store (RFC 2033 §1), where the
/// message should be what we received, and no relay follows that could
/// refuse them. Over SMTP they are folded to 998 octets.
fn content_encoder(dot: bool, lmtp: bool) -> ContentEncoder {
    let encoder = if dot {
        ContentEncoder::dot()
    } else {
        ContentEncoder::chunked()
    };
    if lmtp {
        encoder.keep_long_lines()
    } else {
        encoder
    }
}

impl Body {
    /// Encodes the next `chunk_size` octets of content; true when that was
    /// the end (the encoder is then finished).
    fn next_piece(&mut self, content: &[u8], chunk_size: usize) -> (Vec<u8>, bool) {
        // Room for the piece and some stuffing dots and folds: growing from
        // empty copied each 64 KiB piece about once more.
        let mut out =
            Vec::with_capacity(chunk_size.min(content.len().saturating_sub(self.offset)) + 64);
        loop {
            let end = self
                .offset
                .saturating_add(chunk_size.max(1))
                .min(content.len());
            self.encoder.feed(&content[self.offset..end], &mut out);
            self.offset = end;
            if end == content.len() {
                self.encoder.finish(&mut out);
                return (out, true);
            }
            // A piece held back entirely (inside a line) makes no write.
            if !out.is_empty() {
                return (out, false);
            }
        }
    }
}

impl Run {
    pub(super) fn new(message: Message) -> Run {
        let n = message.recipients.len();
        Run {
            message,
            rcpts: (0..n).map(|_| Rcpt::Pending).collect(),
            started: false,
            mail_line: String::new(),
            rcpt_lines: Vec::new(),
            dsn: false,
            tx: None,
        }
    }

    /// Gives every recipient without an outcome this one.
    pub(super) fn finish_all(&mut self, status: Status, reply: &Reply, local: bool) {
        for r in &mut self.rcpts {
            if !matches!(r, Rcpt::Done(_)) {
                *r = done(status, reply, local);
            }
        }
    }

    pub(super) fn into_outcome(self) -> MessageOutcome {
        let recipients = self
            .rcpts
            .into_iter()
            .map(|r| match r {
                Rcpt::Done(o) => o,
                // Unreachable: callers finish every recipient first.
                _ => RecipientOutcome {
                    status: Status::Temporary,
                    reply: LocalFailure::ConnectionLost.reply(),
                    local: true,
                },
            })
            .collect();
        MessageOutcome {
            recipients,
            dsn: self.dsn,
        }
    }

    fn finish_accepted(&mut self, accepted: &[usize], reply: &Reply) {
        for &i in accepted {
            self.rcpts[i] = done(status_of(reply), &sanitize(reply), false);
        }
    }

    /// The checks before anything is sent, and the command lines.
    fn prepare(&mut self, caps: &Capabilities) -> Result<(), LocalFailure> {
        let m = &self.message;
        let size = m.content.len() as u64;
        if let Some(limit) = caps.size().filter(|&l| l > 0 && size > l) {
            return Err(LocalFailure::TooBig { size, limit });
        }
        let from = m.from.to_string();
        if !command_safe(&from) {
            return Err(LocalFailure::BadSender);
        }
        let utf8_envelope = matches!(&m.from, crate::ReversePath::Mailbox(b) if b.is_utf8())
            || m.recipients.iter().any(|r| {
                r.to.is_utf8() || r.params.orcpt.as_ref().is_some_and(Orcpt::needs_smtputf8)
            });
        let needs_utf8 =
            utf8_envelope || (m.params.smtputf8 && !header_section(&m.content).is_ascii());
        let has_utf8 = caps.has("SMTPUTF8");
        if needs_utf8 && !has_utf8 {
            return Err(LocalFailure::NoSmtpUtf8);
        }
        let eight_bit = !m.content.is_ascii();
        let has_8bit = caps.has("8BITMIME");
        if eight_bit && !has_8bit {
            return Err(LocalFailure::No8BitMime);
        }
        let smtputf8 = has_utf8 && (needs_utf8 || m.params.smtputf8);
        self.dsn = caps.has("DSN");
        let mut line = format!("MAIL FROM:{from}");
        if caps.size().is_some() {
            line.push_str(&format!(" SIZE={size}"));
        }
        if has_8bit && (eight_bit || m.params.body == Some(BodyType::EightBitMime)) {
            line.push_str(" BODY=8BITMIME");
        }
        if smtputf8 {
            line.push_str(" SMTPUTF8");
        }
        if self.dsn {
            match m.params.ret {
                Some(Ret::Full) => line.push_str(" RET=FULL"),
                Some(Ret::Hdrs) => line.push_str(" RET=HDRS"),
                None => {}
            }
            if let Some(envid) = &m.params.envid {
                line.push_str(&format!(" ENVID={}", xtext_encode(envid)));
            }
        }
        self.mail_line = line;
        self.rcpt_lines = m
            .recipients
            .iter()
            .map(|r| rcpt_line(r, self.dsn, smtputf8))
            .collect();
        for (i, l) in self.rcpt_lines.iter().enumerate() {
            if l.is_none() {
                self.rcpts[i] = done_local(LocalFailure::BadRecipient);
            }
        }
        Ok(())
    }
}

fn done(status: Status, reply: &Reply, local: bool) -> Rcpt {
    Rcpt::Done(RecipientOutcome {
        status,
        reply: reply.clone(),
        local,
    })
}

fn done_local(f: LocalFailure) -> Rcpt {
    let reply = f.reply();
    done(status_of(&reply), &reply, true)
}

/// `RCPT TO:<path>` with NOTIFY and ORCPT under DSN; `None` when the path
/// or ORCPT cannot go in a command.
fn rcpt_line(r: &super::Recipient, dsn: bool, smtputf8: bool) -> Option<String> {
    let mut line = format!("RCPT TO:{}", r.to);
    if dsn {
        if let Some(n) = r.params.notify {
            let mut words = Vec::new();
            if n.never {
                words.push("NEVER");
            } else {
                for (on, w) in [
                    (n.success, "SUCCESS"),
                    (n.failure, "FAILURE"),
                    (n.delay, "DELAY"),
                ] {
                    if on {
                        words.push(w);
                    }
                }
            }
            if !words.is_empty() {
                line.push_str(&format!(" NOTIFY={}", words.join(",")));
            }
        }
        if let Some(o) = &r.params.orcpt {
            line.push_str(&format!(" ORCPT={}", orcpt_value(o, smtputf8)?));
        }
    }
    command_safe(&line).then_some(line)
}

/// `addr-type;value`: xtext (RFC 3461 §4.2), or for the `utf-8` type the
/// RFC 6533 §3 forms: raw UTF-8 in an SMTPUTF8 transaction, `\x{HEX}`
/// escapes otherwise.
fn orcpt_value(o: &Orcpt, smtputf8: bool) -> Option<String> {
    let atom = !o.addr_type.is_empty()
        && o.addr_type
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if !atom {
        return None;
    }
    if !o.addr_type.eq_ignore_ascii_case("utf-8") {
        return Some(format!("{};{}", o.addr_type, xtext_encode(&o.address)));
    }
    let mut v = String::new();
    for c in o.address.chars() {
        let plain = matches!(c, '!'..='~') && !matches!(c, '+' | '\\' | '=');
        if plain || (!c.is_ascii() && smtputf8 && !c.is_control()) {
            v.push(c);
        } else if (c as u32) < 0x100 {
            v.push_str(&format!("\\x{{{:02X}}}", c as u32));
        } else {
            v.push_str(&format!("\\x{{{:X}}}", c as u32));
        }
    }
    Some(format!("{};{v}", o.addr_type))
}

/// The header section: everything before the first empty line.
fn header_section(content: &[u8]) -> &[u8] {
    if content.starts_with(b"\r\n") || content.starts_with(b"\n") {
        return &[];
    }
    let crlf = memchr::memmem::find(content, b"\r\n\r\n");
    let lf = memchr::memmem::find(content, b"\n\n");
    let end = match (crlf, lf) {
        (Some(a), Some(b)) => a.min(b),
        (a, b) => a.or(b).unwrap_or(content.len()),
    };
    &content[..end]
}

/// 452 "too many recipients" (RFC 5321 §4.5.3.1.10): send the rest later.
fn too_many_recipients(r: &Reply) -> bool {
    r.code == 452
        && match r.enhanced {
            Some(e) => e == EnhancedCode(4, 5, 3),
            None => r
                .lines
                .iter()
                .any(|l| l.to_ascii_lowercase().contains("too many recipients")),
        }
}

impl Client {
    /// Starts the message handed to `send` (connection set up, idle).
    pub(super) fn start_message(&mut self) {
        self.phase = Phase::Busy;
        let Some(run) = self.run.as_mut() else {
            self.ready();
            return;
        };
        if !run.started {
            run.started = true;
            if let Err(f) = run.prepare(&self.caps) {
                let reply = f.reply();
                run.finish_all(status_of(&reply), &reply, true);
            }
        }
        self.next_transaction();
    }

    /// The next transaction of the message, or its outcome when every
    /// recipient has one.
    pub(super) fn next_transaction(&mut self) {
        let Some(run) = self.run.as_mut() else {
            self.ready();
            return;
        };
        let max = match self.config.max_recipients {
            0 => usize::MAX,
            n => n,
        };
        let batch: Vec<usize> = (0..run.rcpts.len())
            .filter(|&i| matches!(run.rcpts[i], Rcpt::Pending))
            .take(max)
            .collect();
        if batch.is_empty() {
            self.finish_message();
            return;
        }
        let mut commands = VecDeque::new();
        commands.push_back((run.mail_line.clone(), Expect::Mail));
        for &i in &batch {
            run.rcpts[i] = Rcpt::Sent;
            let line = run.rcpt_lines.get(i).cloned().flatten().unwrap_or_default();
            commands.push_back((line, Expect::Rcpt(i)));
        }
        let pipelined = self.caps.has("PIPELINING");
        let chunked = self.caps.has("CHUNKING");
        let mut tx = Tx {
            unsent: VecDeque::new(),
            mail_ok: None,
            accepted: Vec::new(),
            chunked,
            pipelined,
            body: None,
            settled: false,
            abandoned: false,
            done: false,
        };
        if !pipelined {
            tx.unsent = commands;
            run.tx = Some(tx);
            self.advance();
            return;
        }
        let mut write = Vec::new();
        for (line, expect) in commands {
            write.extend_from_slice(line.as_bytes());
            write.extend_from_slice(b"\r\n");
            self.expect.push_back(expect);
        }
        if chunked {
            // RFC 3030 §4.2: BDAT may be pipelined after the RCPTs; if
            // none is accepted the chunk is read and refused, nothing more.
            let mut body = Body {
                encoder: content_encoder(false, self.config.protocol == Protocol::Lmtp),
                offset: 0,
            };
            let content = run.message.content.clone();
            let (chunk, last) = self.bdat_chunk(&mut body, &content);
            write.extend(chunk);
            if !last {
                tx.body = Some(body);
            }
        }
        self.events.push_back(super::Event::Write(write));
        if let Some(run) = self.run.as_mut() {
            run.tx = Some(tx);
        }
    }

    /// The next BDAT command with its chunk; pushes what it expects.
    fn bdat_chunk(&mut self, body: &mut Body, content: &[u8]) -> (Vec<u8>, bool) {
        let (data, last) = body.next_piece(content, self.config.chunk_size);
        let mut w =
            format!("BDAT {}{}\r\n", data.len(), if last { " LAST" } else { "" }).into_bytes();
        w.extend_from_slice(&data);
        self.expect
            .push_back(if last { Expect::Final } else { Expect::Chunk });
        (w, last)
    }

    /// Writes the next piece of content when the transaction may: called
    /// when the driver has taken every event, so at most one piece is held.
    pub(super) fn pump_content(&mut self) {
        let Some(run) = self.run.as_mut() else {
            return;
        };
        let Some(tx) = run.tx.as_mut() else {
            return;
        };
        let Some(mut body) = tx.body.take() else {
            return;
        };
        let content = run.message.content.clone();
        if tx.chunked {
            if !tx.pipelined && self.expect.contains(&Expect::Chunk) {
                tx.body = Some(body);
                return;
            }
            let (w, last) = self.bdat_chunk(&mut body, &content);
            self.events.push_back(super::Event::Write(w));
            if !last && let Some(tx) = self.run.as_mut().and_then(|r| r.tx.as_mut()) {
                tx.body = Some(body);
            }
            return;
        }
        let (data, last) = body.next_piece(&content, self.config.chunk_size);
        self.events.push_back(super::Event::Write(data));
        if !last {
            tx.body = Some(body);
        }
    }

    /// A reply to MAIL, RCPT, DATA, a chunk, or after the content.
    pub(super) fn on_transaction_reply(&mut self, expect: Expect, reply: Reply) {
        let lmtp = self.config.protocol == Protocol::Lmtp;
        let Some(run) = self.run.as_mut() else {
            self.fail_local(LocalFailure::OutOfSequence, false);
            return;
        };
        let Some(tx) = run.tx.as_mut() else {
            self.fail_local(LocalFailure::OutOfSequence, false);
            return;
        };
        let class = reply.code / 100;
        let mut out_of_sequence = false;
        match expect {
            Expect::Mail => match class {
                2 => tx.mail_ok = Some(true),
                4 | 5 => {
                    tx.mail_ok = Some(false);
                    tx.unsent.clear();
                    // MAIL refused: the sender is, for every recipient.
                    run.finish_all(status_of(&reply), &sanitize(&reply), false);
                }
                _ => out_of_sequence = true,
            },
            // After a refused MAIL the RCPT replies are read and dropped.
            Expect::Rcpt(_) if tx.mail_ok != Some(true) => {}
            Expect::Rcpt(i) => match class {
                2 => {
                    run.rcpts[i] = Rcpt::Accepted;
                    tx.accepted.push(i);
                }
                4 if too_many_recipients(&reply) => {
                    run.rcpts[i] = Rcpt::Deferred(sanitize(&reply));
                }
                4 | 5 => run.rcpts[i] = done(status_of(&reply), &sanitize(&reply), false),
                _ => out_of_sequence = true,
            },
            Expect::Data => match class {
                3 => {
                    tx.body = Some(Body {
                        encoder: content_encoder(true, lmtp),
                        offset: 0,
                    });
                    self.expect.push_back(Expect::Final);
                }
                4 | 5 => {
                    let accepted = std::mem::take(&mut tx.accepted);
                    run.finish_accepted(&accepted, &reply);
                }
                _ => out_of_sequence = true,
            },
            Expect::Chunk if tx.abandoned => {}
            Expect::Chunk => match class {
                2 => {}
                4 | 5 => {
                    // RFC 3030 §2: a refused chunk fails the transaction;
                    // no more chunks are sent.
                    tx.abandoned = true;
                    tx.body = None;
                    let accepted = std::mem::take(&mut tx.accepted);
                    run.finish_accepted(&accepted, &reply);
                }
                _ => out_of_sequence = true,
            },
            // The server answered before the end of DATA content: it cannot
            // be in step with us.
            Expect::Final if tx.body.is_some() => out_of_sequence = true,
            Expect::Final if tx.abandoned || tx.accepted.is_empty() => {}
            Expect::Final | Expect::FinalFor(_) if class == 3 => out_of_sequence = true,
            Expect::Final if lmtp => {
                // RFC 2033 §4.2: one reply per accepted recipient, in order.
                tx.done = true;
                let first = tx.accepted[0];
                for &i in tx.accepted[1..].iter().rev() {
                    self.expect.push_front(Expect::FinalFor(i));
                }
                run.finish_accepted(&[first], &reply);
            }
            Expect::Final => {
                tx.done = true;
                let accepted = std::mem::take(&mut tx.accepted);
                run.finish_accepted(&accepted, &reply);
            }
            Expect::FinalFor(i) => run.finish_accepted(&[i], &reply),
            _ => out_of_sequence = true,
        }
        if out_of_sequence {
            self.fail_local(LocalFailure::OutOfSequence, false);
            return;
        }
        self.advance();
    }

    /// Moves the transaction on after a reply: the next command without
    /// PIPELINING, DATA or the chunks once the RCPTs are settled, and the
    /// end when nothing is outstanding.
    fn advance(&mut self) {
        let Some(tx) = self.run.as_mut().and_then(|r| r.tx.as_mut()) else {
            return;
        };
        if !tx.settled {
            if !tx.unsent.is_empty() {
                if self.expect.is_empty()
                    && let Some((line, expect)) = tx.unsent.pop_front()
                {
                    self.write_command(line, expect);
                }
                return;
            }
            if self
                .expect
                .iter()
                .any(|e| matches!(e, Expect::Mail | Expect::Rcpt(_)))
            {
                return;
            }
            tx.settled = true;
            self.after_rcpts();
        }
        let Some(tx) = self.run.as_mut().and_then(|r| r.tx.as_mut()) else {
            return;
        };
        if tx.body.is_none() && self.expect.is_empty() {
            self.end_transaction();
        }
    }

    /// Every RCPT reply is in: send the content, or give up on it.
    fn after_rcpts(&mut self) {
        let Some(run) = self.run.as_mut() else {
            return;
        };
        let Some(tx) = run.tx.as_mut() else {
            return;
        };
        let progress = !tx.accepted.is_empty();
        for r in &mut run.rcpts {
            if let Rcpt::Deferred(reply) = r {
                *r = if progress {
                    Rcpt::Pending
                } else {
                    done(Status::Temporary, reply, false)
                };
            }
        }
        if tx.mail_ok != Some(true) || !progress {
            tx.abandoned = true;
            tx.body = None;
            return;
        }
        if tx.chunked {
            if !tx.pipelined {
                tx.body = Some(Body {
                    encoder: content_encoder(false, self.config.protocol == Protocol::Lmtp),
                    offset: 0,
                });
            }
            return;
        }
        self.write_command("DATA".into(), Expect::Data);
    }

    /// The transaction's last reply is in: RSET if the server may still
    /// hold it open, then the next one.
    fn end_transaction(&mut self) {
        let Some(tx) = self.run.as_mut().and_then(|r| r.tx.take()) else {
            return;
        };
        if tx.mail_ok == Some(true) && !tx.done {
            self.write_command("RSET".into(), Expect::Rset);
        } else {
            self.next_transaction();
        }
    }

    fn finish_message(&mut self) {
        if let Some(run) = self.run.take() {
            let outcome = run.into_outcome();
            self.events.push_back(super::Event::Outcome(outcome));
        }
        self.ready();
    }
}
