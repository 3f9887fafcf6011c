//! STARTTLS (RFC 3207) and the SMTP side of AUTH (RFC 4954): when each may
//! run, what EHLO offers, the 334 challenge lines and the client's SASL
//! response lines.
//!
//! Rules chosen where the RFCs leave room (each the stricter reading):
//! - STARTTLS and AUTH need EHLO first (both exist only as EHLO keywords),
//!   and are refused inside a mail transaction: RFC 4954 §4 says so for
//!   AUTH; for STARTTLS RFC 3207 §4.2 would make the server forget the
//!   transaction anyway, and Postfix refuses it after MAIL too.
//! - A `-PLUS` mechanism (channel binding) is offered over TLS only, and
//!   asked for without TLS it gets 538 5.7.11, the RFC 4954 §6 reply for
//!   "this mechanism needs encryption".
//! - The AUTH command line and each SASL response line may be 12288 octets
//!   long with CRLF (RFC 4954 §4), whatever `max_command_line` says: long
//!   tokens (XOAUTH2, GSSAPI) must fit.
//! - Every STARTTLS and AUTH command counts as a command without mail (see
//!   `junk`), so even with `max_errors` 0 a client cannot try passwords
//!   forever on one connection; each failed exchange also counts as an
//!   error through its 4xx/5xx reply.
//!
//! Invariants: a SASL response line is never echoed: the session only
//! hands its decoded octets to the driver. Input leaves
//! `Mode::AuthResponse` after one line (complete, or over-long), and the
//! session is then back in command mode or waiting for the driver.
//!
//! Not done: SASL security layers (RFC 4954 §4 allows them; no mechanism we
//! offer negotiates one), and the obsolete `AUTH=` EHLO keyword.
//!
//! Errors: replies, listed in `starttls_refusal`, `auth_refusal` and
//! `step_auth_response`.

use super::{Event, Mode, Pending, Query, Session, Tls};
use crate::base64;
use crate::command::SaslData;
use crate::ehlo::{Offers, ehlo_reply};
use crate::reply::Reply;

/// Longest AUTH command line and SASL response line, CRLF included
/// (RFC 4954 §4).
pub(super) const MAX_AUTH_LINE: usize = 12288;

/// Channel-binding mechanisms (RFC 5802 §4) end so: they bind to TLS.
const PLUS: &str = "-PLUS";

fn encryption_required() -> Reply {
    Reply::enhanced(
        538,
        (5, 7, 11),
        "Error: encryption required for requested authentication mechanism",
    )
}

fn bad_base64() -> Reply {
    Reply::enhanced(
        501,
        (5, 5, 2),
        "Error: cannot Base64-decode client response",
    )
}

impl Session {
    /// The standard EHLO reply, with what the session offers right now.
    pub(super) fn ehlo_reply(&self, domain: &str) -> Reply {
        let mechanisms = self.advertised_mechanisms();
        let offers = Offers {
            starttls: self.config.starttls && self.tls == Tls::Plain,
            auth: &mechanisms,
        };
        ehlo_reply(
            &self.config.hostname,
            domain,
            self.config.max_message_size,
            offers,
        )
    }

    /// True when AUTH may run now, mechanisms aside.
    fn auth_available(&self) -> bool {
        !self.config.auth_mechanisms.is_empty()
            && !self.authenticated
            && (self.tls == Tls::Active || self.config.auth_without_tls)
    }

    /// The mechanisms for EHLO's AUTH line; none when AUTH is not on offer.
    fn advertised_mechanisms(&self) -> Vec<&str> {
        if !self.auth_available() {
            return Vec::new();
        }
        let bindable = self.tls == Tls::Active && self.channel_binding;
        (self.config.auth_mechanisms.iter())
            .filter(|m| bindable || !m.ends_with(PLUS))
            .map(String::as_str)
            .collect()
    }

    /// True when AUTH would be offered once TLS is active but is not now:
    /// the client must STARTTLS first.
    pub(super) fn auth_waits_for_tls(&self) -> bool {
        !self.config.auth_mechanisms.is_empty()
            && self.tls == Tls::Plain
            && !self.config.auth_without_tls
            && self.config.starttls
    }

    /// The verb of `line` when it is STARTTLS or AUTH and this session
    /// never offers it: such a line is answered as before these extensions
    /// existed (502, "not implemented"), whatever its arguments.
    pub(super) fn disabled_verb(&self, line: &[u8]) -> Option<&'static str> {
        let verb = line.split(|&b| b == b' ').next().unwrap_or(line);
        let verb = verb.trim_ascii_end();
        if verb.eq_ignore_ascii_case(b"STARTTLS") && !self.config.starttls && self.tls == Tls::Plain
        {
            Some("STARTTLS")
        } else if verb.eq_ignore_ascii_case(b"AUTH") && self.config.auth_mechanisms.is_empty() {
            Some("AUTH")
        } else {
            None
        }
    }

    /// True when `line` (the start of the input) is an AUTH command of a
    /// session that offers AUTH: its line may be longer (`MAX_AUTH_LINE`).
    pub(super) fn is_auth_line(&self, line: &[u8]) -> bool {
        !self.config.auth_mechanisms.is_empty()
            && line.len() >= 5
            && line[..4].eq_ignore_ascii_case(b"AUTH")
            && line[4] == b' '
    }

    fn starttls_refusal(&self, parameters: bool) -> Option<Reply> {
        let refuse = |code, status, text: &str| Some(Reply::enhanced(code, status, text));
        if parameters {
            refuse(501, (5, 5, 4), "Syntax: STARTTLS")
        } else if self.tls != Tls::Plain {
            refuse(503, (5, 5, 1), "Error: TLS already active")
        } else if !self.esmtp {
            refuse(503, (5, 5, 1), "Error: send EHLO first")
        } else if self.tx.is_some() {
            refuse(503, (5, 5, 1), "Error: MAIL transaction in progress")
        } else {
            None
        }
    }

    /// RFC 3207 §4: 220, then the handshake. Whatever followed the
    /// STARTTLS line in the input was sent before the client could have
    /// seen the 220: it is dropped, never run (CVE-2011-0411).
    pub(super) fn cmd_starttls(&mut self, parameters: bool) {
        if let Some(reply) = self.starttls_refusal(parameters) {
            self.reply(reply);
            return;
        }
        self.input = Vec::new();
        self.reply(Reply::enhanced(220, (2, 0, 0), "Ready to start TLS"));
        self.events.push_back(Event::StartTls);
        self.tls = Tls::Starting;
    }

    fn auth_refusal(&self, mechanism: &str) -> Option<Reply> {
        let refuse = |code, status, text: &str| Some(Reply::enhanced(code, status, text));
        let tls = self.tls == Tls::Active;
        if !self.esmtp {
            refuse(503, (5, 5, 1), "Error: send EHLO first")
        } else if self.authenticated {
            // §4: one successful AUTH per session.
            refuse(503, (5, 5, 1), "Error: already authenticated")
        } else if self.tx.is_some() {
            refuse(503, (5, 5, 1), "Error: MAIL transaction in progress")
        } else if !tls && !self.config.auth_without_tls && !self.config.starttls {
            // Neither now nor after a handshake this session could have.
            refuse(503, (5, 5, 1), "Error: authentication not enabled")
        } else if !self.config.auth_mechanisms.iter().any(|m| m == mechanism)
            || (tls && !self.channel_binding && mechanism.ends_with(PLUS))
        {
            // Before 538: TLS would not make an unknown mechanism work.
            refuse(
                504,
                (5, 5, 4),
                "Error: unsupported authentication mechanism",
            )
        } else if !tls && (!self.config.auth_without_tls || mechanism.ends_with(PLUS)) {
            Some(encryption_required())
        } else {
            None
        }
    }

    /// RFC 4954 §4: checks, decodes the initial response (`=` is present
    /// and empty) and asks the driver.
    pub(super) fn cmd_auth(&mut self, mechanism: String, initial: Option<SaslData>) {
        if let Some(reply) = self.auth_refusal(&mechanism) {
            self.reply(reply);
            return;
        }
        let initial = match initial {
            None => None,
            Some(r) if r.as_bytes() == b"=" => Some(SaslData::default()),
            Some(r) => match base64::decode(r.as_bytes()) {
                Some(octets) => Some(SaslData::new(octets)),
                None => {
                    self.reply(bad_base64());
                    return;
                }
            },
        };
        self.ask(Query::Auth { mechanism, initial }, Pending::Auth);
    }

    /// `Decision::AuthChallenge`: 334 and the challenge in base64
    /// (`334 ` alone for an empty one), then the client's next line is its
    /// response.
    pub(super) fn auth_challenge(&mut self, challenge: &[u8]) {
        self.reply(Reply::new(334, None, base64::encode(challenge)));
        self.mode = Mode::AuthResponse;
    }

    /// `Decision::Accept` to an AUTH query: 235 (or the driver's reply).
    pub(super) fn auth_succeeded(&mut self, custom: Option<Reply>) {
        self.authenticated = true;
        self.reply(
            custom.unwrap_or_else(|| Reply::enhanced(235, (2, 7, 0), "Authentication successful")),
        );
    }

    /// Frames the client's line after a 334 (only CRLF ends it, as for
    /// commands) and hands it to the driver decoded, or ends the exchange:
    /// `*` 501 5.0.0 (cancelled, §4), bad base64 501 5.5.2, a bare LF
    /// 501 5.5.2 (and the rest of that line is refused like a command
    /// line's), over `MAX_AUTH_LINE` 500 5.5.6 (the rest of the line is
    /// skipped unbuffered). The session goes on in command mode after each.
    pub(super) fn step_auth_response(&mut self) -> bool {
        let Some(lf) = self.input.iter().position(|&b| b == b'\n') else {
            let ends_cr = self.input.last() == Some(&b'\r');
            if self.input.len() - usize::from(ends_cr) + 2 > MAX_AUTH_LINE {
                self.mode = Mode::Command;
                self.skipping_line = true;
                self.skip_prev_cr = ends_cr;
                self.input = Vec::new();
                self.reply(auth_line_too_long());
                return true;
            }
            return false;
        };
        self.mode = Mode::Command;
        if lf == 0 || self.input[lf - 1] != b'\r' {
            self.line_tainted = true;
            self.consume(lf + 1);
            self.reply(Reply::enhanced(
                501,
                (5, 5, 2),
                "Error: bare <LF> in authentication exchange",
            ));
            return true;
        }
        if lf + 1 > MAX_AUTH_LINE {
            self.consume(lf + 1);
            self.reply(auth_line_too_long());
            return true;
        }
        let line = &self.input[..lf - 1];
        let decoded = if line == b"*" {
            Err(Reply::enhanced(501, (5, 0, 0), "Authentication cancelled"))
        } else {
            base64::decode(line).ok_or_else(bad_base64)
        };
        self.consume(lf + 1);
        match decoded {
            Ok(octets) => self.ask(Query::AuthResponse(SaslData::new(octets)), Pending::Auth),
            Err(reply) => self.reply(reply),
        }
        true
    }
}

/// RFC 4954 §6.
pub(super) fn auth_line_too_long() -> Reply {
    Reply::enhanced(500, (5, 5, 6), "Authentication Exchange line is too long")
}
