//! SMTP command lines: verb recognition, argument syntax and ESMTP
//! parameters (RFC 5321 §4.1.1, RFC 1870 SIZE, RFC 6152 8BITMIME, RFC 6531
//! SMTPUTF8, RFC 3461 DSN, RFC 3030 BDAT).
//!
//! `parse_command` takes one line without its CRLF and returns a
//! [`Command`] or a [`CommandError`]. Verbs are case-insensitive (§2.4).
//!
//! Invariants: a parsed `Command` is syntactically valid; every
//! `CommandError` maps to exactly one reply via [`CommandError::reply`].
//!
//! AUTH (RFC 4954 §4) and STARTTLS (RFC 3207 §4) are parsed here, their
//! arguments only as far as syntax goes: whether they are offered, and
//! decoding the initial response, are the session's.
//!
//! Not done here: sequencing (MAIL before HELO...), limits that depend on
//! configuration (SIZE against the maximum, recipient count, AUTH's longer
//! line), the rule that UTF-8 addresses need SMTPUTF8, and the rule that
//! ESMTP parameters need EHLO: all of those are in `server`.
//!
//! Errors: [`CommandError`]: unknown verb 500 5.5.2, a forbidden octet
//! (NUL, bare CR, another control character, invalid UTF-8) 501 with the
//! enhanced code of the part it spoils (5.5.2 command, 5.1.7 sender, 5.1.3
//! recipient, 5.5.4 parameters), known-but-unimplemented verb 502 5.5.1, HTTP request 554 5.5.1 (and
//! close), argument syntax 501 5.5.4 (RFC 3463: "invalid command
//! arguments"), bad sender 501 5.1.7, bad recipient 501 5.1.3 (also for an
//! over-long address, §4.5.3.1.10), unknown or unadvertised parameter 555 5.5.4 (§4.1.1.11),
//! duplicate or malformed parameter 501 5.5.4.

mod params;

use std::fmt;

use crate::address::{self, AddressError, ForwardPath, ReversePath};
use crate::reply::{EnhancedCode, Reply};

pub use params::{
    BodyType, MailParams, Notify, Orcpt, RcptParams, Ret, xtext_decode, xtext_encode,
};

/// One parsed command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `HELO domain`; the argument is a Domain or an address literal.
    Helo(String),
    /// `EHLO domain`.
    Ehlo(String),
    Mail(ReversePath, MailParams),
    Rcpt(ForwardPath, RcptParams),
    Data,
    /// `BDAT size [LAST]` (RFC 3030 §2).
    Bdat {
        size: u64,
        last: bool,
    },
    Rset,
    Noop,
    Quit,
    Vrfy(String),
    Help(Option<String>),
    /// `STARTTLS` (RFC 3207 §4); `parameters` when anything followed the
    /// verb, which the session refuses with 501 5.5.4 once it knows that
    /// STARTTLS is offered at all.
    StartTls {
        parameters: bool,
    },
    /// `AUTH mechanism [initial-response]` (RFC 4954 §4). The mechanism
    /// is upper-cased and has the SASL name syntax (RFC 4422 §3.1); the
    /// initial response is still base64 (or `=`), since the session decides
    /// whether the command may run before it decodes anything.
    Auth {
        mechanism: String,
        initial: Option<SaslData>,
    },
}

/// Octets of a SASL exchange: credentials, or a step towards them. Kept
/// out of `Debug` output (not even the length shows), so logging a
/// command, a query or a session never writes a password into a log.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct SaslData(Vec<u8>);

impl SaslData {
    pub fn new(octets: Vec<u8>) -> SaslData {
        SaslData(octets)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for SaslData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SaslData(<redacted>)")
    }
}

/// Why a command line was refused; see the module header for the replies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandError {
    /// NUL, CR, LF or another control character, or bytes that are not
    /// UTF-8, at `place` in the line.
    ForbiddenOctet { octet: BadOctet, place: OctetPlace },
    /// Not an SMTP verb.
    UnknownVerb,
    /// A verb we recognise but do not implement (EXPN, ETRN...), or AUTH
    /// and STARTTLS where the session does not offer them.
    NotImplemented(&'static str),
    /// The line looks like an HTTP request: a cross-protocol attack.
    CrossProtocol,
    /// Bad arguments; the text is a usage hint.
    Syntax(&'static str),
    /// Bad HELO/EHLO argument (replied without an enhanced code, RFC 2034 §3).
    HeloSyntax(&'static str),
    /// Bad `MAIL FROM` path.
    BadSender(AddressError),
    /// Bad `RCPT TO` path.
    BadRecipient(AddressError),
    /// Unknown or unadvertised ESMTP parameter (keyword upper-cased).
    UnknownParameter(String),
    /// Malformed or repeated ESMTP parameter.
    BadParameter(&'static str),
}

impl CommandError {
    /// The reply the session sends for this error.
    pub fn reply(&self) -> Reply {
        let e = |c, s, d| Some(EnhancedCode(c, s, d));
        match self {
            // 501, not 500: the verb may be fine, the line's octets are not;
            // the enhanced code names what they spoil (RFC 3463).
            CommandError::ForbiddenOctet { octet, place } => {
                let (detail, what) = match place {
                    OctetPlace::Command => (e(5, 5, 2), "command"),
                    OctetPlace::Sender => (e(5, 1, 7), "sender address"),
                    OctetPlace::Recipient => (e(5, 1, 3), "recipient address"),
                    OctetPlace::Parameters => (e(5, 5, 4), "parameters"),
                };
                Reply::new(501, detail, format!("Error: {} in {what}", octet.name()))
            }
            CommandError::UnknownVerb => {
                Reply::new(500, e(5, 5, 2), "Error: command not recognized")
            }
            CommandError::NotImplemented(v) => {
                Reply::new(502, e(5, 5, 1), format!("Error: {v} not implemented"))
            }
            CommandError::CrossProtocol => {
                Reply::new(554, e(5, 5, 1), "Error: this is an SMTP server")
            }
            CommandError::Syntax(usage) => Reply::new(501, e(5, 5, 4), format!("Syntax: {usage}")),
            CommandError::HeloSyntax(usage) => Reply::new(501, None, format!("Syntax: {usage}")),
            CommandError::BadSender(a) => address_reply(a, 7, "sender"),
            CommandError::BadRecipient(a) => address_reply(a, 3, "recipient"),
            CommandError::UnknownParameter(k) => {
                Reply::new(555, e(5, 5, 4), format!("Error: unsupported parameter {k}"))
            }
            CommandError::BadParameter(what) => {
                Reply::new(501, e(5, 5, 4), format!("Error: {what}"))
            }
        }
    }

    /// True when the session must close after the reply (HTTP requests:
    /// the peer is not an SMTP client, answering more only helps attacks).
    pub fn closes_connection(&self) -> bool {
        matches!(self, CommandError::CrossProtocol)
    }
}

/// A kind of octet that never belongs in a command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadOctet {
    Nul,
    /// A CR that is not part of the CRLF ending the line (§2.3.8).
    BareCr,
    /// Another control character (TAB is allowed).
    Control,
    /// Bytes that are not UTF-8.
    NotUtf8,
}

impl BadOctet {
    fn name(self) -> &'static str {
        match self {
            BadOctet::Nul => "NUL",
            BadOctet::BareCr => "bare <CR>",
            BadOctet::Control => "control character",
            BadOctet::NotUtf8 => "invalid UTF-8",
        }
    }

    /// The octet class of `b`, if it may not appear in a command line.
    fn classify(b: u8) -> Option<BadOctet> {
        match b {
            0 => Some(BadOctet::Nul),
            b'\r' => Some(BadOctet::BareCr),
            b'\t' => None,
            b if b < 32 || b == 127 => Some(BadOctet::Control),
            _ => None,
        }
    }
}

/// Which part of a command line holds a forbidden octet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OctetPlace {
    /// The verb, or the argument of a verb without a path.
    Command,
    /// The reverse-path of MAIL.
    Sender,
    /// The forward-path of RCPT.
    Recipient,
    /// ESMTP parameters after a path.
    Parameters,
}

/// Where the octet at `at` sits in `line`: in the path of a MAIL or RCPT
/// (up to its closing `>`), in that command's parameters, or elsewhere.
fn octet_place(line: &[u8], at: usize) -> OctetPlace {
    let verb_end = line.iter().position(|&b| b == b' ').unwrap_or(line.len());
    let verb = &line[..verb_end];
    let place = if verb.eq_ignore_ascii_case(b"MAIL") {
        OctetPlace::Sender
    } else if verb.eq_ignore_ascii_case(b"RCPT") {
        OctetPlace::Recipient
    } else {
        return OctetPlace::Command;
    };
    if at < verb_end {
        return OctetPlace::Command;
    }
    let path_end = line[verb_end..]
        .iter()
        .position(|&b| b == b'>')
        .map(|i| verb_end + i);
    match path_end {
        Some(end) if at > end => OctetPlace::Parameters,
        _ => place,
    }
}

/// The first forbidden octet of a command line (without its CRLF), as an error.
pub fn forbidden_octet(line: &[u8]) -> Option<CommandError> {
    let (at, octet) = match line
        .iter()
        .enumerate()
        .find_map(|(i, &b)| BadOctet::classify(b).map(|o| (i, o)))
    {
        Some(found) => found,
        None => {
            let e = std::str::from_utf8(line).err()?;
            (e.valid_up_to(), BadOctet::NotUtf8)
        }
    };
    Some(CommandError::ForbiddenOctet {
        octet,
        place: octet_place(line, at),
    })
}

/// RFC 3463: X.1.7 bad sender syntax, X.1.3 bad destination syntax. An
/// over-long path is a syntax error too: RFC 5321 §4.5.3.1.10 names
/// "501 Path too long".
fn address_reply(a: &AddressError, detail: u16, who: &str) -> Reply {
    Reply::new(
        501,
        Some(EnhancedCode(5, 1, detail)),
        format!("Error: bad {who} address: {a}"),
    )
}

/// HTTP methods: a browser or proxy talking to an SMTP port (cross-protocol
/// request smuggling, e.g. "HTTP POST to port 25").
const HTTP_VERBS: &[&str] = &[
    "GET", "POST", "CONNECT", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE",
    // The HTTP/2 connection preface: `PRI * HTTP/2.0`.
    "PRI",
];

/// Known verbs we do not implement (RFC 5321 §4.2.4: 502).
const UNIMPLEMENTED: &[&str] = &[
    "ETRN", "EXPN", "TURN", "ATRN", "SEND", "SOML", "SAML", "VERB", "XCLIENT", "XFORWARD",
];

/// Parses one command line (without CRLF).
pub fn parse_command(line: &[u8]) -> Result<Command, CommandError> {
    // NUL, CR and LF are never valid in a command line (§2.3.8, §4.1.1);
    // other control characters except TAB are refused too, and so are
    // bytes that are not UTF-8.
    if let Some(e) = forbidden_octet(line) {
        return Err(e);
    }
    let Ok(line) = std::str::from_utf8(line) else {
        // Unreachable: `forbidden_octet` refuses what is not UTF-8.
        return Err(CommandError::UnknownVerb);
    };
    // Trailing blanks are common from hand-typed sessions and harmless.
    let line = line.trim_end_matches([' ', '\t']);
    let (verb, args) = match line.split_once(' ') {
        Some((verb, args)) => (verb, Some(args)),
        None => (line, None),
    };
    if !verb.bytes().all(|b| b.is_ascii_alphabetic()) || verb.is_empty() {
        return Err(CommandError::UnknownVerb);
    }
    let verb = verb.to_ascii_uppercase();
    if args.is_some() && HTTP_VERBS.contains(&verb.as_str()) {
        return Err(CommandError::CrossProtocol);
    }
    if let Some(v) = UNIMPLEMENTED.iter().find(|v| **v == verb) {
        return Err(CommandError::NotImplemented(v));
    }
    // So are extra spaces after the verb (`MAIL  FROM:`), which Postfix
    // and Exim accept too.
    let args = args
        .map(|a| a.trim_start_matches(' '))
        .filter(|a| !a.is_empty());
    match verb.as_str() {
        "HELO" => parse_helo(args, "HELO domain").map(Command::Helo),
        "EHLO" => parse_helo(args, "EHLO domain").map(Command::Ehlo),
        "MAIL" => parse_mail(args.unwrap_or("")),
        "RCPT" => parse_rcpt(args.unwrap_or("")),
        "DATA" => no_args(args, Command::Data, "DATA"),
        "RSET" => no_args(args, Command::Rset, "RSET"),
        "QUIT" => no_args(args, Command::Quit, "QUIT"),
        // §4.1.1.9: NOOP may carry a string, which is ignored.
        "NOOP" => Ok(Command::Noop),
        "VRFY" => args
            .map(|a| Command::Vrfy(a.to_string()))
            .ok_or(CommandError::Syntax("VRFY address")),
        "HELP" => Ok(Command::Help(args.map(str::to_string))),
        "BDAT" => parse_bdat(args.unwrap_or("")),
        "STARTTLS" => Ok(Command::StartTls {
            parameters: args.is_some(),
        }),
        "AUTH" => parse_auth(args.unwrap_or("")),
        _ => Err(CommandError::UnknownVerb),
    }
}

fn no_args(args: Option<&str>, cmd: Command, usage: &'static str) -> Result<Command, CommandError> {
    if args.is_some() {
        Err(CommandError::Syntax(usage))
    } else {
        Ok(cmd)
    }
}

/// `ehlo = "EHLO" SP ( Domain / address-literal )` (§4.1.1.1), read the
/// way deployed servers read it: extra spaces before the name, `_` in
/// labels (Windows host names) and a trailing root dot are accepted, since
/// refusing HELO leaves a misconfigured client no way to send at all (and
/// §4.1.4 forbids refusing mail over a HELO name that merely does not
/// verify). Address literals stay strict, and nothing but one name is
/// accepted, so the name is always safe to repeat in a trace header.
fn parse_helo(args: Option<&str>, usage: &'static str) -> Result<String, CommandError> {
    let arg = args.ok_or(CommandError::HeloSyntax(usage))?;
    if address::parse_domain(arg).is_err() && !lenient_helo_name(arg) {
        return Err(CommandError::HeloSyntax(usage));
    }
    Ok(arg.to_string())
}

/// A host name with `_` allowed in labels and an optional trailing dot:
/// labels of letters, digits, `-`, `_` or UTF-8, 1 to 63 octets, at most
/// 255 octets in all.
fn lenient_helo_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 255
        && name.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b >= 0x80)
        })
}

/// Splits `PREFIX:<path> params`: the prefix is case-insensitive; one space
/// after the colon is tolerated as most servers do.
fn strip_prefix_ci<'a>(args: &'a str, prefix: &str) -> Option<&'a str> {
    let head = args.get(..prefix.len())?;
    if !head.eq_ignore_ascii_case(prefix) {
        return None;
    }
    let rest = &args[prefix.len()..];
    Some(rest.strip_prefix(' ').unwrap_or(rest))
}

const JUNK_AFTER_PATH: &str = "junk after the address";

/// Text right after a path's `>` (`<a@b>>`): the path itself is malformed.
struct JunkAfterPath;

/// The ESMTP parameters after a path: nothing, or SP-separated keywords.
fn split_params(rest: &str) -> Result<Vec<&str>, JunkAfterPath> {
    if rest.is_empty() {
        return Ok(Vec::new());
    }
    let rest = rest.strip_prefix(' ').ok_or(JunkAfterPath)?;
    Ok(rest.split(' ').filter(|p| !p.is_empty()).collect())
}

/// `"MAIL FROM:" Reverse-path [SP Mail-parameters]` (§4.1.1.2).
fn parse_mail(args: &str) -> Result<Command, CommandError> {
    const USAGE: &str = "MAIL FROM:<address>";
    let rest = strip_prefix_ci(args, "FROM:").ok_or(CommandError::Syntax(USAGE))?;
    if !rest.starts_with('<') {
        return Err(CommandError::Syntax(USAGE));
    }
    let (path, n) = address::parse_reverse_path(rest).map_err(CommandError::BadSender)?;
    let params = split_params(&rest[n..])
        .map_err(|_| CommandError::BadSender(AddressError::Syntax(JUNK_AFTER_PATH)))?;
    let params = MailParams::parse(&params)?;
    Ok(Command::Mail(path, params))
}

/// `"RCPT TO:" Forward-path [SP Rcpt-parameters]` (§4.1.1.3).
fn parse_rcpt(args: &str) -> Result<Command, CommandError> {
    const USAGE: &str = "RCPT TO:<address>";
    let rest = strip_prefix_ci(args, "TO:").ok_or(CommandError::Syntax(USAGE))?;
    if !rest.starts_with('<') {
        return Err(CommandError::Syntax(USAGE));
    }
    let (path, n) = address::parse_forward_path(rest).map_err(CommandError::BadRecipient)?;
    let params = split_params(&rest[n..])
        .map_err(|_| CommandError::BadRecipient(AddressError::Syntax(JUNK_AFTER_PATH)))?;
    let params = RcptParams::parse(&params)?;
    Ok(Command::Rcpt(path, params))
}

/// `"BDAT" SP chunk-size [SP end-marker]` (RFC 3030 §2).
fn parse_bdat(args: &str) -> Result<Command, CommandError> {
    const USAGE: &str = "BDAT size [LAST]";
    let mut it = args.split(' ').filter(|a| !a.is_empty());
    let size = it.next().unwrap_or("");
    if size.is_empty() || size.len() > 20 || !size.bytes().all(|b| b.is_ascii_digit()) {
        return Err(CommandError::Syntax(USAGE));
    }
    let size: u64 = size.parse().map_err(|_| CommandError::Syntax(USAGE))?;
    let last = match it.next() {
        None => false,
        Some(m) if m.eq_ignore_ascii_case("LAST") => true,
        Some(_) => return Err(CommandError::Syntax(USAGE)),
    };
    if it.next().is_some() {
        return Err(CommandError::Syntax(USAGE));
    }
    Ok(Command::Bdat { size, last })
}

/// `"AUTH" SP sasl-mech [SP initial-response]` (RFC 4954 §4), where
/// sasl-mech is 1 to 20 of `A-Z 0-9 - _` (RFC 4422 §3.1; matched without
/// regard to case, as clients differ) and initial-response is base64 or
/// `=` (checked by the session).
fn parse_auth(args: &str) -> Result<Command, CommandError> {
    const USAGE: &str = "AUTH mechanism [initial-response]";
    let mut it = args.split(' ').filter(|a| !a.is_empty());
    let mechanism = it.next().unwrap_or("").to_ascii_uppercase();
    let name_ok = (1..=20).contains(&mechanism.len())
        && mechanism
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !name_ok {
        return Err(CommandError::Syntax(USAGE));
    }
    let initial = it.next().map(|r| SaslData::new(r.as_bytes().to_vec()));
    if it.next().is_some() {
        return Err(CommandError::Syntax(USAGE));
    }
    Ok(Command::Auth { mechanism, initial })
}

/// The chunk size a BDAT line announces, read as far as the line allows:
/// `None` if it is not a BDAT line, `Some(None)` if it is one whose size
/// cannot be read. RFC 3030 §2: the chunk's octets follow a BDAT whatever
/// the reply, so a BDAT line refused for any reason still tells where the
/// next command starts, or that nobody can know.
pub fn announced_chunk_size(line: &[u8]) -> Option<Option<u64>> {
    let verb = line.get(..4)?;
    if !verb.eq_ignore_ascii_case(b"BDAT") {
        return None;
    }
    let rest = &line[4..];
    match rest.first() {
        // BDATX: another (unknown) verb.
        Some(b) if b.is_ascii_alphanumeric() => return None,
        // `BDAT<TAB>102`: a reader that splits on any blank sees a chunk
        // here, so nobody can say where the next command starts.
        Some(&b) if b != b' ' => return Some(None),
        _ => {}
    }
    let rest = &rest[rest.iter().take_while(|&&b| b == b' ').count()..];
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || rest.get(digits).is_some_and(|&b| b != b' ') {
        return Some(None);
    }
    Some(
        std::str::from_utf8(&rest[..digits])
            .ok()
            .and_then(|d| d.parse().ok()),
    )
}

#[cfg(test)]
#[path = "command_tests.rs"]
mod tests;
