//! Replies the client makes up itself (when the server gave none that
//! applies), and sanitising of the replies servers do give.
//!
//! Invariants: every [`LocalFailure`] maps to exactly one reply, 4xx for
//! what another attempt may cure and 5xx for what it cannot; a sanitised
//! reply holds printable ASCII only, at most [`MAX_OUTCOME_LINES`] lines and
//! [`MAX_OUTCOME_TEXT`] octets of text, because it ends up in logs and bounces.
//!
//! Not done: translating a server's text (it is kept, only cleaned).
//!
//! Errors: none.

use std::fmt;

use crate::reply::{EnhancedCode, Reply};

use super::Stage;

/// Lines of a server reply kept in an outcome.
pub const MAX_OUTCOME_LINES: usize = 8;
/// Octets of text (all lines together) kept in an outcome.
pub const MAX_OUTCOME_TEXT: usize = 512;

/// Why the client failed a connection, a message or a recipient without a
/// server reply that says so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalFailure {
    /// The server closed the connection: 451 4.4.2.
    ConnectionLost,
    /// No reply within the stage's time: 451 4.4.2.
    Timeout(Stage),
    /// Bytes that are not an SMTP reply, a line over `MAX_REPLY_LINE`, or a
    /// reply with too many lines or octets: 451 4.5.0; the text says which.
    MalformedReply(&'static str),
    /// A reply nothing was waiting for, or of a kind that does not fit the
    /// command (e.g. 354 to RCPT): 451 4.5.0.
    OutOfSequence,
    /// Bytes after the 220 to STARTTLS, before the handshake: a response
    /// injection attempt (CVE-2011-0411 style): 451 4.5.0.
    DataBeforeTls,
    /// TLS policy `Require` and no STARTTLS in the EHLO reply: 451 4.7.4.
    TlsNotOffered,
    /// TLS policy `Require` and STARTTLS refused: 451 4.7.4.
    TlsRefused,
    /// The driver's handshake failed: 451 4.7.5.
    TlsFailed,
    /// Credentials are configured but the server offers no mechanism we
    /// speak (PLAIN, LOGIN): 451 4.7.4.
    AuthNotOffered,
    /// Credentials would travel without TLS and the driver did not allow
    /// that: 451 4.7.11.
    AuthNeedsTls,
    /// The server refused our credentials; the server's reply is in the
    /// connection failure. Temporary: fixing the credentials should not
    /// bounce mail. 451 4.7.8.
    AuthFailed,
    /// A user name or password that cannot be sent (NUL for PLAIN, or
    /// control characters): 451 4.7.8.
    BadCredentials,
    /// Our HELO name has octets that cannot go in a command: 451 4.3.5.
    BadHeloName,
    /// RSET was refused, so the connection cannot carry another
    /// transaction: 451 4.5.0.
    RsetRefused,
    /// The message is larger than the server's SIZE: 552 5.3.4.
    TooBig { size: u64, limit: u64 },
    /// UTF-8 in the envelope (or in the header section of a message
    /// flagged SMTPUTF8) and the server has no SMTPUTF8: 550 5.6.7.
    NoSmtpUtf8,
    /// 8-bit octets and the server has no 8BITMIME; we do not convert:
    /// 554 5.6.3.
    No8BitMime,
    /// The reverse-path holds octets that cannot go in a command: 553 5.1.7.
    BadSender,
    /// A forward-path holds octets that cannot go in a command: 553 5.1.3.
    BadRecipient,
}

impl LocalFailure {
    /// The reply recorded for this failure.
    pub fn reply(&self) -> Reply {
        let (code, e, text): (u16, (u8, u16, u16), String) = match self {
            LocalFailure::ConnectionLost => (451, (4, 4, 2), "connection lost".into()),
            LocalFailure::Timeout(stage) => (
                451,
                (4, 4, 2),
                format!("timeout waiting for the {stage} reply"),
            ),
            LocalFailure::MalformedReply(what) => (
                451,
                (4, 5, 0),
                format!("malformed reply from server: {what}"),
            ),
            LocalFailure::OutOfSequence => {
                (451, (4, 5, 0), "reply out of sequence from server".into())
            }
            LocalFailure::DataBeforeTls => (
                451,
                (4, 5, 0),
                "server sent data after its STARTTLS reply".into(),
            ),
            LocalFailure::TlsNotOffered => (451, (4, 7, 4), "TLS required but not offered".into()),
            LocalFailure::TlsRefused => (
                451,
                (4, 7, 4),
                "TLS required but STARTTLS was refused".into(),
            ),
            LocalFailure::TlsFailed => (451, (4, 7, 5), "TLS handshake failed".into()),
            LocalFailure::AuthNotOffered => (
                451,
                (4, 7, 4),
                "AUTH PLAIN or LOGIN required but not offered".into(),
            ),
            LocalFailure::AuthNeedsTls => (
                451,
                (4, 7, 11),
                "not sending credentials without TLS".into(),
            ),
            LocalFailure::AuthFailed => {
                (451, (4, 7, 8), "authentication failed at the server".into())
            }
            LocalFailure::BadCredentials => (
                451,
                (4, 7, 8),
                "credentials contain octets that cannot be sent".into(),
            ),
            LocalFailure::BadHeloName => (451, (4, 3, 5), "bad local HELO name".into()),
            LocalFailure::RsetRefused => (451, (4, 5, 0), "server refused RSET".into()),
            LocalFailure::TooBig { size, limit } => (
                552,
                (5, 3, 4),
                format!("message size {size} exceeds the server's limit of {limit}"),
            ),
            LocalFailure::NoSmtpUtf8 => (
                550,
                (5, 6, 7),
                "message needs SMTPUTF8, which the server does not support".into(),
            ),
            LocalFailure::No8BitMime => (
                554,
                (5, 6, 3),
                "8-bit message, server does not support 8BITMIME (not converted)".into(),
            ),
            LocalFailure::BadSender => (
                553,
                (5, 1, 7),
                "sender address cannot be sent in a command".into(),
            ),
            LocalFailure::BadRecipient => (
                553,
                (5, 1, 3),
                "recipient address cannot be sent in a command".into(),
            ),
        };
        Reply::new(code, Some(EnhancedCode(e.0, e.1, e.2)), text)
    }
}

impl fmt::Display for LocalFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.reply(), f)
    }
}

/// A server reply made safe to log and to quote in a bounce: printable
/// ASCII only (anything else becomes `?`, a tab a space), at most
/// `MAX_OUTCOME_LINES` lines and `MAX_OUTCOME_TEXT` octets of text.
pub fn sanitize(reply: &Reply) -> Reply {
    let mut budget = MAX_OUTCOME_TEXT;
    let mut lines = Vec::new();
    for line in reply.lines.iter().take(MAX_OUTCOME_LINES) {
        if budget == 0 {
            break;
        }
        let mut clean = String::new();
        for c in line.chars() {
            if clean.len() >= budget {
                break;
            }
            clean.push(match c {
                ' '..='~' => c,
                '\t' => ' ',
                _ => '?',
            });
        }
        budget -= clean.len();
        lines.push(clean);
    }
    if lines.is_empty() {
        lines.push(String::new());
    }
    Reply {
        code: reply.code,
        enhanced: reply.enhanced,
        lines,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_bounds_and_cleans() {
        let r = Reply::new(550, None, "bad\u{7}\u{e9}\ttext");
        assert_eq!(sanitize(&r).lines, vec!["bad?? text"]);
        let long = Reply::new(550, None, "x".repeat(2000));
        assert_eq!(sanitize(&long).lines[0].len(), MAX_OUTCOME_TEXT);
        let many = Reply {
            code: 250,
            enhanced: None,
            lines: vec!["a".into(); 50],
        };
        assert_eq!(sanitize(&many).lines.len(), MAX_OUTCOME_LINES);
    }

    #[test]
    fn every_local_reply_is_well_formed() {
        let all = [
            LocalFailure::ConnectionLost,
            LocalFailure::Timeout(Stage::DataEnd),
            LocalFailure::MalformedReply("x"),
            LocalFailure::OutOfSequence,
            LocalFailure::DataBeforeTls,
            LocalFailure::TlsNotOffered,
            LocalFailure::TlsRefused,
            LocalFailure::TlsFailed,
            LocalFailure::AuthNotOffered,
            LocalFailure::AuthNeedsTls,
            LocalFailure::AuthFailed,
            LocalFailure::BadCredentials,
            LocalFailure::BadHeloName,
            LocalFailure::RsetRefused,
            LocalFailure::TooBig { size: 2, limit: 1 },
            LocalFailure::NoSmtpUtf8,
            LocalFailure::No8BitMime,
            LocalFailure::BadSender,
            LocalFailure::BadRecipient,
        ];
        for f in all {
            let r = f.reply();
            let e = r.enhanced.unwrap();
            assert_eq!(u16::from(e.0), r.code / 100, "{f:?}");
            assert_eq!(Reply::parse(&r.to_bytes()).unwrap().0, r);
            assert_eq!(sanitize(&r), r);
        }
    }
}
