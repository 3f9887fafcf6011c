//! Command-phase input: framing of command lines (only CRLF ends one) and
//! the handler of each verb, with RFC 5321 §4.1.4 sequencing.
//!
//! Invariants: an over-long line produces exactly one 500 and is discarded
//! up to its CRLF without being buffered; a bare CR or LF never makes a
//! command run: a bare CR makes its whole line a 500, and a bare LF is
//! answered with a 500 at once (so an LF-only client is not left waiting)
//! and taints the line up to its CRLF, every piece of which then gets a 500
//! too (`RCPT TO:<a>\nRCPT TO:<b>\r\n` runs neither: no command injection
//! through an application that strips CRLF but not LF).
//!
//! Not done: applying decisions (see `decide`).
//!
//! Errors: every refusal here is a reply (see `CommandError::reply` and the
//! per-verb checks).

use super::auth::{MAX_AUTH_LINE, auth_line_too_long};
use super::{Event, Mode, Pending, Query, Session, Transaction};
use crate::address::{ForwardPath, ReversePath};
use crate::command::{
    Command, CommandError, MailParams, Orcpt, RcptParams, announced_chunk_size, parse_command,
};
use crate::data::ContentError;
use crate::reply::Reply;

impl Session {
    /// Frames one command line; false when more input is needed.
    pub(super) fn step_command(&mut self) -> bool {
        if self.skipping_line {
            return self.skip_long_line();
        }
        if !self.seen_command {
            let Some(&first) = self.input.first() else {
                return false;
            };
            if is_binary(first) {
                // A TLS ClientHello, an SSLv2 hello or other binary junk: no
                // SMTP client starts so. One reply and close, rather than a
                // reply per fragment until the command timeout.
                self.input = Vec::new();
                self.close_with(CommandError::CrossProtocol.reply());
                return true;
            }
            self.seen_command = true;
        }
        // AUTH lines may be longer (RFC 4954 §4); the line is at the start
        // of the input, so its verb shows once its first five octets came.
        let auth_line = self.is_auth_line(&self.input);
        let max = if auth_line {
            self.config.max_command_line.max(MAX_AUTH_LINE)
        } else {
            self.config.max_command_line.max(3)
        };
        let too_long = || {
            if auth_line {
                auth_line_too_long()
            } else {
                Reply::enhanced(500, (5, 5, 2), "Error: line too long")
            }
        };
        let Some(lf) = self.input.iter().position(|&b| b == b'\n') else {
            // The CR of a CRLF may already be here: don't count it.
            let content = self.input.len() - usize::from(self.input.last() == Some(&b'\r'));
            if content + 2 > max {
                if !self.line_tainted && announced_chunk_size(&self.input).is_some() {
                    self.bdat_unframable();
                    return true;
                }
                self.skipping_line = true;
                // The skip discards through the CRLF, which ends a tainted line.
                self.line_tainted = false;
                self.skip_prev_cr = self.input.last() == Some(&b'\r');
                self.input = Vec::new();
                self.reply(too_long());
                return true;
            }
            return false;
        };
        let bare = lf == 0 || self.input[lf - 1] != b'\r';
        if bare && !self.line_tainted && announced_chunk_size(&self.input[..lf]).is_some() {
            self.bdat_unframable();
            return true;
        }
        if bare || self.line_tainted {
            // §2.3.8: a bare LF never ends a command. Each piece up to it is
            // answered at once rather than held for a CRLF that an LF-only
            // client never sends; the rest of the line up to its CRLF is
            // refused as well, so nothing after a bare LF ever runs.
            self.line_tainted = bare;
            self.consume(lf + 1);
            self.reply(Reply::enhanced(
                500,
                (5, 5, 2),
                "Error: bare <LF> in command",
            ));
            return true;
        }
        let i = lf - 1;
        if i + 2 > max {
            if announced_chunk_size(&self.input[..i]).is_some() {
                self.bdat_unframable();
                return true;
            }
            self.consume(i + 2);
            self.reply(too_long());
            return true;
        }
        let line = self.input[..i].to_vec();
        self.consume(i + 2);
        // A bare CR (§2.3.8: CR and LF only occur together as a line end) is
        // refused by the parser like any other forbidden octet.
        let parsed = match self.disabled_verb(&line) {
            Some(verb) => Err(CommandError::NotImplemented(verb)),
            None => parse_command(&line),
        };
        match parsed {
            Ok(cmd) => self.command(cmd),
            Err(e) if e.closes_connection() => self.close_with(e.reply()),
            Err(CommandError::UnknownVerb | CommandError::NotImplemented(_)) if self.junk() => {}
            Err(e) => self.refuse_line(&line, e.reply()),
        }
        true
    }

    /// Answers a command line that could not be parsed. A refused BDAT
    /// line is still followed by its chunk (RFC 3030 §2): the chunk is
    /// swallowed before the reply, as for any refused BDAT, so its octets
    /// are never read as commands; if the size cannot be read, the next
    /// command's start is unknowable and the session ends. (Postfix instead
    /// answers 501 and reads the chunk as commands: a proxy modelled on it
    /// would frame such input differently, which is why we never guess.)
    fn refuse_line(&mut self, line: &[u8], reply: Reply) {
        match announced_chunk_size(line) {
            None => self.reply(reply),
            Some(Some(size)) if self.chunk_exceeds_limit(size) => self.chunk_too_large(),
            Some(Some(size)) => {
                self.mode = Mode::Discard {
                    remaining: size,
                    reply,
                }
            }
            Some(None) => self.bdat_unframable(),
        }
    }

    /// A BDAT command whose chunk cannot be delimited (size unreadable, or
    /// the line itself over-long or cut by a bare LF): whatever follows may
    /// be chunk data, so nothing more is read as a command.
    fn bdat_unframable(&mut self) {
        self.discard_input_and_close(Reply::enhanced(
            501,
            (5, 5, 4),
            "Error: BDAT chunk cannot be delimited, closing connection",
        ));
    }

    /// Ends the session when what follows the current command cannot be
    /// framed as commands (a BDAT chunk that will not be read, content sent
    /// before its 354): it is dropped unread, with the transaction.
    fn discard_input_and_close(&mut self, reply: Reply) {
        self.input = Vec::new();
        self.reset_transaction();
        self.close_with(reply);
    }

    /// True when one BDAT chunk alone is over the message size limit.
    fn chunk_exceeds_limit(&self, size: u64) -> bool {
        let max = self.config.max_message_size;
        max != 0 && size > max
    }

    /// A chunk bigger than any message we take: swallowing it would keep the
    /// client (and us) busy for gigabytes before it learns the answer, so it
    /// gets the answer at once and the session ends, since what follows on
    /// the wire is that chunk.
    fn chunk_too_large(&mut self) {
        match self.msg.as_mut() {
            Some(msg) => msg.fail(ContentError::TooLarge),
            None if self.tx.is_some() => self
                .events
                .push_back(Event::MessageRefused(ContentError::TooLarge)),
            None => {}
        }
        self.discard_input_and_close(Reply::enhanced(
            552,
            (5, 3, 4),
            "Error: BDAT chunk exceeds the message size limit, closing connection",
        ));
    }

    /// Counts a command that makes no progress towards a message (NOOP,
    /// RSET, VRFY, HELP, a repeated HELO/EHLO, unknown or unimplemented
    /// verbs, an empty BDAT chunk that is not the last, a RCPT past the
    /// recipient limit), as Postfix's `smtpd_junk_command_limit` does; true when the
    /// session was closed for too many since the last accepted message.
    fn junk(&mut self) -> bool {
        self.junk_commands += 1;
        let max = self.config.max_junk_commands;
        if max == 0 || self.junk_commands <= max {
            return false;
        }
        let text = format!(
            "{} Error: too many commands without mail",
            self.config.hostname
        );
        self.close_with(Reply::enhanced(421, (4, 7, 0), &text));
        true
    }

    /// Discards input up to and including the CRLF ending an over-long line.
    fn skip_long_line(&mut self) -> bool {
        if self.input.is_empty() {
            return false;
        }
        let end = if self.skip_prev_cr && self.input[0] == b'\n' {
            Some(1)
        } else {
            find_crlf(&self.input).map(|i| i + 2)
        };
        match end {
            Some(n) => {
                self.consume(n);
                self.skipping_line = false;
                self.skip_prev_cr = false;
            }
            None => {
                self.skip_prev_cr = self.input.last() == Some(&b'\r');
                self.input = Vec::new();
            }
        }
        true
    }

    fn command(&mut self, cmd: Command) {
        let junk = match &cmd {
            // STARTTLS and AUTH too: they succeed once per session at most
            // (per TLS layer), so a client repeating them is guessing.
            Command::Rset
            | Command::Noop
            | Command::Vrfy(_)
            | Command::Help(_)
            | Command::StartTls { .. }
            | Command::Auth { .. } => true,
            Command::Helo(_) | Command::Ehlo(_) => self.helo.is_some(),
            _ => false,
        };
        if junk && self.junk() {
            return;
        }
        match cmd {
            Command::Helo(domain) => self.cmd_helo(domain, false),
            Command::Ehlo(domain) => self.cmd_helo(domain, true),
            Command::Mail(from, params) => self.cmd_mail(from, params),
            Command::Rcpt(to, params) => self.cmd_rcpt(to, params),
            Command::Data => self.cmd_data(),
            Command::Bdat { size, last } => self.cmd_bdat(size, last),
            Command::Rset => {
                self.reset_transaction();
                self.reply(Reply::enhanced(250, (2, 0, 0), "Ok"));
            }
            Command::Noop => self.reply(Reply::enhanced(250, (2, 0, 0), "Ok")),
            Command::Quit => self.close_with(Reply::enhanced(221, (2, 0, 0), "Bye")),
            // §3.5.3: 252 when we will not verify; never disclose users.
            Command::Vrfy(_) => self.reply(Reply::enhanced(
                252,
                (2, 0, 0),
                "Cannot VRFY user, but will accept message and attempt delivery",
            )),
            Command::Help(_) => self.reply(Reply::enhanced(
                214,
                (2, 0, 0),
                "Commands: HELO EHLO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP",
            )),
            Command::StartTls { parameters } => self.cmd_starttls(parameters),
            Command::Auth { mechanism, initial } => self.cmd_auth(mechanism, initial),
        }
    }

    /// §4.1.4: EHLO/HELO also resets any transaction.
    fn cmd_helo(&mut self, domain: String, extended: bool) {
        self.reset_transaction();
        let q = Query::Helo {
            domain: domain.clone(),
            extended,
        };
        self.ask(q, Pending::Helo { domain, extended });
    }

    fn cmd_mail(&mut self, from: ReversePath, params: MailParams) {
        let max = self.config.max_message_size;
        let refusal = if self.helo.is_none() {
            Some(Reply::enhanced(
                503,
                (5, 5, 1),
                "Error: send HELO/EHLO first",
            ))
        } else if self.tx.is_some() {
            Some(Reply::enhanced(
                503,
                (5, 5, 1),
                "Error: nested MAIL command",
            ))
        } else if self.config.require_auth && !self.authenticated {
            // RFC 4954 §6 (530 5.7.0); RFC 3207 §4 names the form for
            // "STARTTLS first", when AUTH itself waits for TLS.
            Some(if self.auth_waits_for_tls() {
                Reply::enhanced(530, (5, 7, 0), "Must issue a STARTTLS command first")
            } else {
                Reply::enhanced(530, (5, 7, 0), "Error: authentication required")
            })
        } else if !self.esmtp && !params.is_empty() {
            // Nothing was advertised after HELO (§4.1.1.11).
            Some(Reply::enhanced(
                555,
                (5, 5, 4),
                "Error: ESMTP parameters need EHLO",
            ))
        } else if max != 0 && params.size.is_some_and(|s| s > max) {
            // RFC 1870 §6.2.
            self.events
                .push_back(Event::MessageRefused(ContentError::TooLarge));
            Some(Reply::enhanced(
                552,
                (5, 3, 4),
                "Error: message size exceeds fixed limit",
            ))
        } else if matches!(&from, ReversePath::Mailbox(m) if m.is_utf8()) && !params.smtputf8 {
            // RFC 6531 §3.6 / RFC 6533: UTF-8 address without SMTPUTF8.
            Some(Reply::enhanced(
                553,
                (5, 6, 7),
                "Error: UTF-8 address needs SMTPUTF8",
            ))
        } else {
            None
        };
        match refusal {
            Some(reply) => self.reply(reply),
            None => {
                let q = Query::Mail {
                    from: from.clone(),
                    params: params.clone(),
                };
                self.ask(q, Pending::Mail(from, params));
            }
        }
    }

    fn cmd_rcpt(&mut self, to: ForwardPath, params: RcptParams) {
        let over_limit = self.msg.is_none()
            && (self.tx.as_ref()).is_some_and(|tx| tx.rcpts.len() >= self.config.max_recipients);
        // A RCPT past the limit is not an error (see `reply`), but no
        // progress either: a client repeating it forever meets the junk limit.
        if over_limit && self.junk() {
            return;
        }
        let refusal = match &self.tx {
            None => Some(Reply::enhanced(503, (5, 5, 1), "Error: need MAIL command")),
            // RFC 3030 §2: after BDAT only BDAT (or RSET...) continues.
            Some(_) if self.msg.is_some() => {
                Some(Reply::enhanced(503, (5, 5, 1), "Error: RCPT after BDAT"))
            }
            Some(tx) if tx.rcpts.len() >= self.config.max_recipients => {
                // §4.5.3.1.10: 452 for too many recipients.
                Some(Reply::enhanced(
                    452,
                    (4, 5, 3),
                    "Error: too many recipients",
                ))
            }
            Some(_) if !self.esmtp && !params.is_empty() => Some(Reply::enhanced(
                555,
                (5, 5, 4),
                "Error: ESMTP parameters need EHLO",
            )),
            Some(tx) if to.is_utf8() && !tx.params.smtputf8 => Some(Reply::enhanced(
                553,
                (5, 6, 7),
                "Error: UTF-8 address needs SMTPUTF8",
            )),
            // RFC 6533 §3: a UTF-8 original recipient only in an SMTPUTF8
            // transaction; otherwise it must be sent as utf-8-addr-xtext.
            Some(tx)
                if !tx.params.smtputf8
                    && params.orcpt.as_ref().is_some_and(Orcpt::needs_smtputf8) =>
            {
                Some(Reply::enhanced(
                    501,
                    (5, 5, 4),
                    "Error: UTF-8 in ORCPT needs SMTPUTF8",
                ))
            }
            Some(_) => None,
        };
        match refusal {
            Some(reply) => self.reply(reply),
            None => {
                let q = Query::Rcpt {
                    to: to.clone(),
                    params: params.clone(),
                };
                self.ask(q, Pending::Rcpt(to, params));
            }
        }
    }

    fn cmd_data(&mut self) {
        let refusal = match &self.tx {
            None => Some(Reply::enhanced(503, (5, 5, 1), "Error: need MAIL command")),
            Some(_) if self.msg.is_some() => {
                Some(Reply::enhanced(503, (5, 5, 1), "Error: DATA after BDAT"))
            }
            // §3.3: DATA with no accepted recipient.
            Some(tx) if tx.rcpts.is_empty() => Some(Reply::enhanced(
                554,
                (5, 5, 1),
                "Error: no valid recipients",
            )),
            Some(_) => None,
        };
        if !self.input.is_empty() {
            // Checked first: whatever follows DATA in the same read is message
            // content sent without waiting for our reply, even when the DATA
            // itself is refused; it must never run as commands.
            self.pipelining_violation();
        } else if let Some(reply) = refusal {
            // The transaction is over after a refused DATA: a client must
            // start again with MAIL.
            self.reset_transaction();
            self.reply(reply);
        } else {
            self.ask(Query::Data, Pending::Data);
        }
    }

    /// RFC 2920 §3.1: DATA ends a command group; content sent before the
    /// 354 means the client is broken or smuggling. Drop it all and close:
    /// whatever follows would be parsed as commands depending on how the
    /// client's bytes happened to be split into packets (Postfix
    /// `smtpd_forbid_unauth_pipelining` does the same).
    pub(super) fn pipelining_violation(&mut self) {
        self.discard_input_and_close(Reply::enhanced(
            554,
            (5, 5, 0),
            "Error: improper use of SMTP command pipelining",
        ));
    }

    /// RFC 3030 §2: the chunk's octets always follow the command, so even
    /// a refused BDAT must swallow them (or they would be read as commands).
    fn cmd_bdat(&mut self, size: u64, last: bool) {
        if self.chunk_exceeds_limit(size) {
            self.chunk_too_large();
            return;
        }
        // An empty chunk that does not end the message moves nothing: as
        // cheap a keep-alive as NOOP, so it counts like one.
        if size == 0 && !last && self.junk() {
            return;
        }
        let refusal = match &self.tx {
            // RFC 3030 §2: BDAT exists only after an EHLO that advertised CHUNKING.
            _ if !self.esmtp => Some(Reply::enhanced(503, (5, 5, 1), "Error: BDAT needs EHLO")),
            None => Some(Reply::enhanced(503, (5, 5, 1), "Error: need MAIL command")),
            Some(tx) if tx.rcpts.is_empty() => Some(Reply::enhanced(
                554,
                (5, 5, 1),
                "Error: no valid recipients",
            )),
            Some(_) => None,
        };
        if let Some(reply) = refusal {
            self.mode = Mode::Discard {
                remaining: size,
                reply,
            };
        } else if self.msg.is_some() {
            self.mode = Mode::Chunk {
                remaining: size,
                size,
                last,
            };
        } else {
            self.ask(Query::Data, Pending::BdatData { size, last });
        }
    }

    pub(super) fn start_transaction(&mut self, from: ReversePath, params: MailParams) {
        self.tx = Some(Transaction {
            from,
            params,
            rcpts: Vec::new(),
        });
    }
}

/// An octet no SMTP command starts with: a control character other than
/// the blanks and line ends a sloppy client may send first, DEL, or 8-bit.
fn is_binary(b: u8) -> bool {
    (b < 32 && !matches!(b, b'\t' | b'\r' | b'\n' | b' ')) || b >= 127
}

fn find_crlf(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\r\n")
}
