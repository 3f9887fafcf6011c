//! Delivery status notifications: the bounce (a recipient failed for good)
//! and the delay notice (a recipient is still being retried), built from a
//! spooled message as RFC 3464 reports.
//!
//! Pure: no I/O, no clock. The caller passes the time in ([`NoticeContext::now`])
//! and spools the returned [`Notice`] with the null reverse-path `<>`
//! (RFC 5321 §4.5.5), so that a notice that cannot be delivered never
//! produces another notice to the sender.
//!
//! # Shape of a notice
//! `multipart/report; report-type=delivery-status` (RFC 6522) with three parts:
//! a plain-English `text/plain` explanation, a `message/delivery-status`
//! report (RFC 3464 §2: per-message fields, then one block per recipient)
//! and the original: in a failure notice `message/rfc822` when RET=FULL or
//! RET is absent and the message fits in [`RETURN_LIMIT`], else (and always
//! in a delay notice) its header section as `text/rfc822-headers`. When the
//! envelope is SMTPUTF8 or any address is not ASCII, the report uses
//! `message/global-delivery-status` (RFC 6533), the original
//! `message/global` or `message/global-headers` if its header section is not
//! ASCII, and the notice must travel with SMTPUTF8 ([`Notice::smtputf8`]).
//!
//! # Who is told
//! [`notice_recipient`] decides: the sender; the postmaster when the failed
//! message had the null sender (it was itself a notice: a double bounce);
//! nobody when that double bounce would be about mail to the postmaster
//! (the loop RFC 3464 §4 warns of), when the message had the null sender and
//! the notice is a delay notice (nobody asked to be told of a notice's delay),
//! or when every recipient's NOTIFY (RFC 3461 §4.1) excludes this kind.
//! NOTIFY absent means FAILURE and DELAY here, as in Postfix.
//!
//! # Invariants
//! - Output is deterministic: the same input gives the same bytes (the MIME
//!   boundary and Message-ID come from the queue id, `now` and the kind).
//! - Every line of the output ends in CRLF and no line is longer than 998
//!   octets (RFC 5322 §2.1.1), whatever the replies contain: they are
//!   stripped of control characters and folded. The original is included
//!   whole only when it already obeys both rules; otherwise only its header
//!   section is, its line ends made CRLF and encoded if a line is too long
//!   (nothing when it has no header section).
//! - Nothing a remote server said reaches a header field of the notice:
//!   replies and remote host names go only into the body parts.
//! - The MIME boundary occurs in no part's content.
//!
//! # Errors
//! None: a notice that is not to be sent is `None` / [`NoticeTo::Nobody`].
//! A [`NoticeRecipient::index`] outside the envelope is skipped.

use crate::spool::{Envelope, MsgId, Recipient};
use mail_builder::MessageBuilder;
use mail_builder::headers::address::Address;
use mail_builder::headers::content_type::ContentType;
use mail_builder::headers::date::Date;
use mail_builder::headers::message_id::MessageId;
use mail_builder::headers::raw::Raw;
use mail_builder::headers::text::Text;
use mail_builder::mime::{BodyPart, MimePart};
use std::borrow::Cow;
use tern_proto::reply::EnhancedCode;

/// The largest original returned whole; above it only the header section is
/// returned (Postfix's `bounce_size_limit` is 50,000: the same idea, rounded
/// up so that a typical message with a small attachment still comes back).
pub const RETURN_LIMIT: usize = 64 * 1024;

/// RFC 5322 §2.1.1: the hard limit on a line, without its CRLF.
const MAX_LINE: usize = 998;
/// Where folding aims: under RFC 5322 §2.1.1's "SHOULD" of 78, and short
/// enough that mail-builder keeps the text part 7bit rather than switching to
/// quoted-printable. A longer word stays whole on its own line up to
/// [`HARD_WORD`].
const SOFT_LINE: usize = 76;
/// A longer word is cut: the indent plus a cut piece stay well under
/// [`MAX_LINE`], and such a "word" is no reader's text anyway.
const HARD_WORD: usize = 900;

/// Which notice to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoticeKind {
    /// The recipients failed for good (a bounce, Action: failed).
    Failure,
    /// The recipients are still being retried (Action: delayed).
    Delay,
}

/// One recipient the notice reports on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NoticeRecipient {
    /// Index into [`Envelope::recipients`].
    pub index: usize,
    /// The reply that decided it, e.g. `550 5.1.1 <x@y>: user unknown`
    /// (single line; may be empty).
    pub reply: String,
    /// The remote host that gave the reply, as `mx.example.net[192.0.2.1]:25`;
    /// `None` when the reply was ours.
    pub remote_host: Option<String>,
    /// Unix seconds of the last attempt.
    pub last_attempt: i64,
    /// For [`NoticeKind::Delay`]: unix seconds when we stop trying.
    pub will_retry_until: Option<i64>,
}

/// What the notice is about and who sends it.
#[derive(Clone, Copy, Debug)]
pub struct NoticeContext<'a> {
    /// Our host name (Reporting-MTA, the From: domain, the Message-ID).
    pub reporting_mta: &'a str,
    pub queue_id: MsgId,
    pub envelope: &'a Envelope,
    /// The spooled message: header section and body, CRLF lines.
    pub original: &'a [u8],
    /// Unix seconds.
    pub now: i64,
    /// e.g. `postmaster@example.org`: where double bounces go.
    pub postmaster: &'a str,
}

/// Who gets the notice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NoticeTo {
    Sender(String),
    /// A double bounce: the failed message had the null sender.
    Postmaster(String),
    Nobody,
}

/// A notice ready to spool with the null reverse-path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    /// The envelope recipient (and To:).
    pub to: String,
    /// A complete RFC 5322 message, CRLF lines.
    pub message: Vec<u8>,
    /// The notice contains non-ASCII addresses or headers: spool it with
    /// SMTPUTF8 (RFC 6531 §3.4).
    pub smtputf8: bool,
    /// The notice contains 8-bit octets: spool it with BODY=8BITMIME
    /// (RFC 6152).
    pub eight_bit: bool,
}

/// Who gets the notice of `kind` about `rcpts`; [`NoticeTo::Nobody`] when
/// none is to be sent (see the module documentation).
pub fn notice_recipient(
    ctx: &NoticeContext,
    kind: NoticeKind,
    rcpts: &[NoticeRecipient],
) -> NoticeTo {
    if reported(ctx, kind, rcpts).is_empty() {
        return NoticeTo::Nobody;
    }
    if !ctx.envelope.sender.is_empty() {
        return NoticeTo::Sender(ctx.envelope.sender.clone());
    }
    match kind {
        NoticeKind::Failure => NoticeTo::Postmaster(ctx.postmaster.to_string()),
        NoticeKind::Delay => NoticeTo::Nobody,
    }
}

/// Builds the notice of `kind` about those of `rcpts` whose NOTIFY asks for
/// it; `None` when nothing is to be sent.
pub fn build_notice(
    ctx: &NoticeContext,
    kind: NoticeKind,
    rcpts: &[NoticeRecipient],
) -> Option<Notice> {
    let (to, double) = match notice_recipient(ctx, kind, rcpts) {
        NoticeTo::Sender(to) => (to, false),
        NoticeTo::Postmaster(to) => (to, true),
        NoticeTo::Nobody => return None,
    };
    let reported = reported(ctx, kind, rcpts);
    let global = ctx.envelope.smtputf8
        || !to.is_ascii()
        || !ctx.envelope.sender.is_ascii()
        || reported.iter().any(|(r, _)| {
            !r.address.is_ascii() || r.orcpt.as_deref().is_some_and(|o| !o.is_ascii())
        });

    let text = human_text(ctx, kind, double, &reported);
    let report = delivery_status(ctx, kind, global, &reported);
    let returned = returned_part(ctx, kind, global);

    let base = format!(
        "tern-dsn-{}-{}-{}",
        ctx.queue_id,
        ctx.now,
        kind_letter(kind)
    );
    let boundary = unused_boundary(&base, [text.as_bytes(), report.as_bytes(), returned.body()]);

    let report_type = if global {
        "message/global-delivery-status"
    } else {
        "message/delivery-status"
    };
    let mut parts = vec![
        // Text body: mail-builder picks 7bit, quoted-printable or base64 to
        // suit a non-ASCII address or reply.
        MimePart::new(ContentType::new("text/plain"), text)
            .header("Content-Description", Raw::new("Notification")),
        // Verbatim: the report's fields are header-like lines a reader
        // parses; its transfer encoding is declared, so mail-builder writes
        // the bytes as they are.
        MimePart::new(ContentType::new(report_type), report.into_bytes())
            .header("Content-Description", Raw::new("Delivery report"))
            .transfer_encoding(if global { "8bit" } else { "7bit" }),
    ];
    if let Some(part) = returned.into_part() {
        parts.push(part);
    }
    let body = MimePart::new(
        ContentType::new("multipart/report")
            .attribute("report-type", "delivery-status")
            .attribute("boundary", boundary),
        parts,
    );

    let host = header_safe(ctx.reporting_mta);
    let subject = match (kind, double) {
        (NoticeKind::Failure, false) => "Undelivered Mail Returned to Sender",
        (NoticeKind::Failure, true) => "Undelivered Delivery Notice (double bounce)",
        (NoticeKind::Delay, _) => "Delayed Mail (still being retried)",
    };
    let message_id = format!(
        "{}.{}.{}@{}",
        ctx.queue_id,
        ctx.now,
        kind_letter(kind),
        host
    );
    let message = MessageBuilder::new()
        .from(Address::new_address(
            Some("Mail Delivery System"),
            format!("MAILER-DAEMON@{host}"),
        ))
        .to(Address::new_address(
            None::<&str>,
            to.chars().filter(|c| !c.is_control()).collect::<String>(),
        ))
        .subject(Text::new(subject))
        .date(Date::new(clamp_time(ctx.now)))
        .message_id(MessageId::new(message_id))
        .header("Auto-Submitted", Raw::new("auto-replied"))
        .header("MIME-Version", Raw::new("1.0"))
        .body(body);
    let mut out = Vec::new();
    message.serialize(&mut out);
    let eight_bit = !out.is_ascii();
    Some(Notice {
        to,
        smtputf8: global,
        eight_bit,
        message: out,
    })
}

fn kind_letter(kind: NoticeKind) -> char {
    match kind {
        NoticeKind::Failure => 'F',
        NoticeKind::Delay => 'D',
    }
}

/// The recipients the notice reports on, with the envelope's entry for each:
/// those whose NOTIFY asks for `kind`, minus (for a message with the null
/// sender) the postmaster, whose failure nobody can be told of.
fn reported<'a, 'r>(
    ctx: &NoticeContext<'a>,
    kind: NoticeKind,
    rcpts: &'r [NoticeRecipient],
) -> Vec<(&'a Recipient, &'r NoticeRecipient)> {
    rcpts
        .iter()
        .filter_map(|n| Some((ctx.envelope.recipients.get(n.index)?, n)))
        .filter(|(r, _)| wants(r.notify.as_deref(), kind))
        .filter(|(r, _)| !(ctx.envelope.sender.is_empty() && is_postmaster(ctx, r)))
        .collect()
}

/// RFC 3461 §4.1, with an absent NOTIFY taken as FAILURE,DELAY (Postfix's
/// default). NEVER and SUCCESS alone ask for neither.
fn wants(notify: Option<&str>, kind: NoticeKind) -> bool {
    let Some(notify) = notify else {
        return true;
    };
    let word = match kind {
        NoticeKind::Failure => "FAILURE",
        NoticeKind::Delay => "DELAY",
    };
    notify
        .split(',')
        .any(|w| w.trim().eq_ignore_ascii_case(word))
}

/// The recipient is the postmaster: the configured address, or the bare
/// `postmaster` RFC 5321 §4.5.1 lets a client name without a domain, as
/// given or after alias expansion.
fn is_postmaster(ctx: &NoticeContext, r: &Recipient) -> bool {
    [r.address.as_str(), r.original.as_str()]
        .iter()
        .any(|a| a.eq_ignore_ascii_case(ctx.postmaster) || a.eq_ignore_ascii_case("postmaster"))
}

/// A value from our own config or envelope for a header: control characters
/// and whitespace removed, so it can neither end the field nor be folded.
fn header_safe(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_control() && !c.is_whitespace())
        .collect()
}

/// Text from a remote server or from DNS: control characters (CR, LF, NUL,
/// TAB, DEL, C1) become spaces so that neither a line nor a field can be
/// ended early; with `ascii_only`, other non-ASCII characters become `?`
/// (RFC 3464 fields are US-ASCII outside RFC 6533's global report).
fn clean(s: &str, ascii_only: bool) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() {
                ' '
            } else if ascii_only && !c.is_ascii() {
                '?'
            } else {
                c
            }
        })
        .collect::<String>()
        .trim()
        .to_string()
}

/// Folds `first` + `value` into lines of about [`SOFT_LINE`] octets, the
/// continuation lines starting with `indent`. Words longer than
/// [`HARD_WORD`] octets are cut (at a character boundary), so no line
/// exceeds [`MAX_LINE`]. Every line ends CRLF.
fn fold(first: &str, value: &str, indent: &str, out: &mut String) {
    let mut line = String::from(first);
    let mut line_has_word = false;
    for word in value.split(' ').filter(|w| !w.is_empty()) {
        for piece in cut(word, HARD_WORD) {
            if line_has_word && line.len() + 1 + piece.len() > SOFT_LINE {
                out.push_str(&line);
                out.push_str("\r\n");
                line = String::from(indent);
            } else if line_has_word {
                line.push(' ');
            }
            line.push_str(piece);
            line_has_word = true;
        }
    }
    debug_assert!(line.len() <= MAX_LINE || !line_has_word);
    out.push_str(&line);
    out.push_str("\r\n");
}

/// Splits `s` into pieces of at most `max` octets at character boundaries.
fn cut(s: &str, max: usize) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut rest = s;
    while rest.len() > max {
        let mut at = max;
        while !rest.is_char_boundary(at) {
            at -= 1;
        }
        let (head, tail) = rest.split_at(at);
        pieces.push(head);
        rest = tail;
    }
    pieces.push(rest);
    pieces
}

/// The host name of `mx.example.net[192.0.2.1]:25`, or the address when the
/// host had no name (`[192.0.2.1]:25`); only characters a host name or
/// address literal can hold survive.
fn remote_mta_name(remote: &str) -> String {
    let name = match remote.split_once('[') {
        Some(("", rest)) => rest.split(']').next().unwrap_or(""),
        Some((name, _)) => name,
        None => remote.rsplit_once(':').map_or(remote, |(name, _)| name),
    };
    name.chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'))
        .collect()
}

/// Dates outside what RFC 5322 can write (years 1970 to 9999 here) are
/// brought to the nearest end instead of producing a malformed field.
fn clamp_time(t: i64) -> i64 {
    t.clamp(0, 253_402_300_799)
}

fn rfc5322_date(t: i64) -> String {
    Date::new(clamp_time(t)).to_rfc822()
}

/// RFC 3464 §2.3.4 Status: the reply's enhanced code (RFC 3463), else one
/// derived from its basic code. A delay is always transient (4.x.x), a
/// failure whose reply gives no class is permanent (5.0.0); a failure after
/// transient replies keeps its 4.x.x (RFC 3463 §3.1: a persistent transient
/// failure).
fn status(reply: &str, kind: NoticeKind) -> EnhancedCode {
    let mut words = reply.split(' ');
    let first = words.next().unwrap_or("");
    let basic = first
        .get(..3)
        .filter(|c| c.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|c| c.parse::<u16>().ok());
    // The code may be followed by '-' (a continuation line kept as given).
    let enhanced = match first.get(3..) {
        Some("") | Some("-") => words.next().and_then(EnhancedCode::parse),
        _ => None,
    }
    .or_else(|| first.get(4..).and_then(EnhancedCode::parse));
    let code = match (enhanced, basic) {
        (Some(e), Some(b)) if u16::from(e.0) == b / 100 => Some(e),
        (Some(e), None) => Some(e),
        (_, Some(b)) if matches!(b / 100, 4 | 5) => Some(EnhancedCode((b / 100) as u8, 0, 0)),
        _ => None,
    };
    match (kind, code) {
        (NoticeKind::Delay, Some(EnhancedCode(_, s, d))) => EnhancedCode(4, s, d),
        (NoticeKind::Delay, None) => EnhancedCode(4, 0, 0),
        (NoticeKind::Failure, Some(e @ EnhancedCode(4 | 5, _, _))) => e,
        (NoticeKind::Failure, _) => EnhancedCode(5, 0, 0),
    }
}

fn human_text(
    ctx: &NoticeContext,
    kind: NoticeKind,
    double: bool,
    reported: &[(&Recipient, &NoticeRecipient)],
) -> String {
    let mut t = String::new();
    let host = header_safe(ctx.reporting_mta);
    t.push_str(&format!("This is the mail system at host {host}.\r\n\r\n"));
    let intro = match (kind, double) {
        (NoticeKind::Failure, false) => {
            "Your message could not be delivered to the recipients below, and \
             no further attempts will be made. The reasons follow; your \
             message, or its header section, is attached."
        }
        (NoticeKind::Failure, true) => {
            "A delivery notice (a message with no return address) could not \
             be delivered to the recipients below. As it cannot be returned \
             to anyone, it is reported to the postmaster."
        }
        (NoticeKind::Delay, _) => {
            "Your message has not yet been delivered to the recipients below. \
             This is only a warning: the mail system is still trying, and you \
             do not need to send the message again. The reasons for the delay \
             follow; the message's header section is attached."
        }
    };
    fold("", intro, "", &mut t);
    t.push_str("\r\n");
    let sender = if ctx.envelope.sender.is_empty() {
        "<>".to_string()
    } else {
        format!("<{}>", clean(&ctx.envelope.sender, false))
    };
    fold("Queue ID: ", &ctx.queue_id.to_string(), "    ", &mut t);
    fold("Sender: ", &sender, "    ", &mut t);
    fold(
        "Received: ",
        &rfc5322_date(ctx.envelope.received_at),
        "    ",
        &mut t,
    );
    for (r, n) in reported {
        t.push_str("\r\n");
        let what = match kind {
            NoticeKind::Failure => "delivery failed",
            NoticeKind::Delay => "delivery delayed",
        };
        fold(
            "",
            &format!("<{}>: {what}", clean(&r.address, false)),
            "    ",
            &mut t,
        );
        if !r.original.is_empty() && r.original != r.address {
            fold(
                "    (sent to ",
                &format!("<{}>)", clean(&r.original, false)),
                "    ",
                &mut t,
            );
        }
        let who = match &n.remote_host {
            Some(h) => format!("host {}", clean(h, true)),
            None => "the mail system".to_string(),
        };
        let reply = clean(&n.reply, false);
        let said = if reply.is_empty() {
            format!("{who} gave no reason.")
        } else {
            format!("{who} said: {reply}")
        };
        fold("    ", &said, "    ", &mut t);
        if kind == NoticeKind::Delay
            && let Some(until) = n.will_retry_until
        {
            fold(
                "    ",
                &format!("Delivery will be attempted until {}.", rfc5322_date(until)),
                "    ",
                &mut t,
            );
        }
    }
    t
}

fn delivery_status(
    ctx: &NoticeContext,
    kind: NoticeKind,
    global: bool,
    reported: &[(&Recipient, &NoticeRecipient)],
) -> String {
    let ascii = !global;
    let mut s = String::new();
    fold(
        "Reporting-MTA: dns; ",
        &clean(&header_safe(ctx.reporting_mta), true),
        "    ",
        &mut s,
    );
    fold(
        "X-Tern-Queue-ID: ",
        &ctx.queue_id.to_string(),
        "    ",
        &mut s,
    );
    if let Some(envid) = &ctx.envelope.envid {
        fold(
            "Original-Envelope-Id: ",
            &clean(envid, ascii),
            "    ",
            &mut s,
        );
    }
    fold(
        "Arrival-Date: ",
        &rfc5322_date(ctx.envelope.received_at),
        "    ",
        &mut s,
    );
    for (r, n) in reported {
        s.push_str("\r\n");
        if let Some(orcpt) = &r.orcpt {
            fold("Original-Recipient: ", &clean(orcpt, ascii), "    ", &mut s);
        }
        // RFC 6533 §3: a non-ASCII address is of type utf-8.
        let addr_type = if r.address.is_ascii() {
            "rfc822"
        } else {
            "utf-8"
        };
        fold(
            &format!("Final-Recipient: {addr_type}; "),
            &clean(&r.address, ascii),
            "    ",
            &mut s,
        );
        let action = match kind {
            NoticeKind::Failure => "failed",
            NoticeKind::Delay => "delayed",
        };
        s.push_str(&format!("Action: {action}\r\n"));
        s.push_str(&format!("Status: {}\r\n", status(&n.reply, kind)));
        if let Some(host) = &n.remote_host {
            let name = remote_mta_name(host);
            if !name.is_empty() {
                fold("Remote-MTA: dns; ", &name, "    ", &mut s);
            }
        }
        let reply = clean(&n.reply, ascii);
        if !reply.is_empty() {
            fold("Diagnostic-Code: smtp; ", &reply, "    ", &mut s);
        }
        s.push_str(&format!(
            "Last-Attempt-Date: {}\r\n",
            rfc5322_date(n.last_attempt)
        ));
        if kind == NoticeKind::Delay
            && let Some(until) = n.will_retry_until
        {
            s.push_str(&format!("Will-Retry-Until: {}\r\n", rfc5322_date(until)));
        }
    }
    s
}

/// The third part: what of the original is returned.
enum Returned<'a> {
    /// The whole message, verbatim.
    Full { body: &'a [u8], global: bool },
    /// The header section, with its line ends made CRLF when they were not.
    Headers { body: Cow<'a, [u8]>, global: bool },
    /// Nothing fits the rules (RFC 6522 §3 makes the part optional).
    Nothing,
}

impl<'a> Returned<'a> {
    fn body(&self) -> &[u8] {
        match self {
            Returned::Full { body, .. } => body,
            Returned::Headers { body, .. } => body,
            Returned::Nothing => b"",
        }
    }

    fn into_part(self) -> Option<MimePart<'a>> {
        match self {
            Returned::Full { body, global } => {
                let (ctype, description) = if global {
                    ("message/global", "Undelivered Message")
                } else {
                    ("message/rfc822", "Undelivered Message")
                };
                // message/rfc822 admits only 7bit, 8bit or binary (RFC 2046
                // §5.2.1): declared, so mail-builder writes it unencoded;
                // `clean_lines` checked it may be.
                let cte = if body.is_ascii() { "7bit" } else { "8bit" };
                Some(
                    MimePart::new(ContentType::new(ctype), body)
                        .header("Content-Description", Raw::new(description))
                        .transfer_encoding(cte),
                )
            }
            Returned::Headers { body, global } => {
                let ctype = if global {
                    "message/global-headers"
                } else {
                    "text/rfc822-headers"
                };
                // Verbatim when it may be; otherwise (a line over 998
                // octets) mail-builder encodes it: text/* and RFC 6533's
                // message/global-headers both allow quoted-printable or
                // base64, which keep every line short.
                let verbatim = clean_lines(&body);
                let cte = if body.is_ascii() { "7bit" } else { "8bit" };
                let part = MimePart::new(ContentType::new(ctype), BodyPart::Binary(body)).header(
                    "Content-Description",
                    Raw::new("Undelivered Message Headers"),
                );
                Some(if verbatim {
                    part.transfer_encoding(cte)
                } else {
                    part
                })
            }
            Returned::Nothing => None,
        }
    }
}

/// What of the original goes back. A delay notice carries the header
/// section only, whatever RET says: RET governs failure notices (RFC 3461
/// §4.3), and a message still queued for delivery is not being returned.
/// The RFC 6533 types are used only in a global notice whose original has
/// a non-ASCII header section: for an ASCII one message/rfc822 is what every
/// reader knows.
fn returned_part<'a>(ctx: &NoticeContext<'a>, kind: NoticeKind, global: bool) -> Returned<'a> {
    let original = ctx.original;
    let hdrs_only = kind == NoticeKind::Delay
        || ctx
            .envelope
            .ret
            .as_deref()
            .is_some_and(|r| r.eq_ignore_ascii_case("HDRS"));
    let global = global && !header_section(original).is_ascii();
    if !hdrs_only && original.len() <= RETURN_LIMIT && clean_lines(original) {
        return Returned::Full {
            body: original,
            global,
        };
    }
    let headers = header_section(original);
    if headers.is_empty() {
        return Returned::Nothing;
    }
    Returned::Headers {
        body: crlf_lines(headers),
        global,
    }
}

/// `data` with every CR, LF or CRLF made one CRLF, NULs dropped and a CRLF
/// ended: mail-builder leaves a bare CR of 7-bit text as it is, and the
/// notice must have none. Borrowed when there is nothing to change.
fn crlf_lines(data: &[u8]) -> Cow<'_, [u8]> {
    let line_ends_ok = data.iter().enumerate().all(|(i, &b)| match b {
        b'\r' => data.get(i + 1) == Some(&b'\n'),
        b'\n' => i > 0 && data.get(i - 1) == Some(&b'\r'),
        0 => false,
        _ => true,
    });
    if line_ends_ok && (data.is_empty() || data.ends_with(b"\r\n")) {
        return Cow::Borrowed(data);
    }
    let mut out = Vec::with_capacity(data.len() + 2);
    let mut bytes = data.iter().copied().peekable();
    while let Some(b) = bytes.next() {
        match b {
            b'\r' => {
                bytes.next_if_eq(&b'\n');
                out.extend_from_slice(b"\r\n");
            }
            b'\n' => out.extend_from_slice(b"\r\n"),
            0 => {}
            _ => out.push(b),
        }
    }
    if !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    Cow::Owned(out)
}

/// The header section of `msg` with the CRLF ending its last field (not the
/// empty line), at most [`RETURN_LIMIT`] octets cut at a line end.
fn header_section(msg: &[u8]) -> &[u8] {
    let end = if msg.starts_with(b"\r\n") {
        0
    } else {
        msg.windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(msg.len(), |p| p + 2)
    };
    let mut headers = msg.get(..end).unwrap_or(msg);
    if headers.len() > RETURN_LIMIT {
        let cut = headers.get(..RETURN_LIMIT).unwrap_or(headers);
        let line_end = cut
            .windows(2)
            .rposition(|w| w == b"\r\n")
            .map_or(0, |p| p + 2);
        headers = headers.get(..line_end).unwrap_or(b"");
    }
    headers
}

/// `data` may be written unencoded: every line ends in CRLF (none bare CR
/// or LF, none unterminated), none exceeds [`MAX_LINE`] octets, and no NUL
/// (RFC 5322 §2.3, RFC 2045 §2.8).
fn clean_lines(data: &[u8]) -> bool {
    if !data.is_empty() && !data.ends_with(b"\r\n") {
        return false;
    }
    data.split(|&b| b == b'\n').all(|line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        line.len() <= MAX_LINE && !line.contains(&b'\r') && !line.contains(&0)
    }) && data
        .iter()
        .enumerate()
        .all(|(i, &b)| b != b'\n' || (i > 0 && data.get(i - 1) == Some(&b'\r')))
}

/// `base` if `--base` occurs in none of `parts`, else the first `base.N` that
/// does not: deterministic, yet no content can end a part early.
fn unused_boundary<const N: usize>(base: &str, parts: [&[u8]; N]) -> String {
    let occurs = |b: &str| {
        let delim = format!("--{b}");
        parts
            .iter()
            .any(|p| p.windows(delim.len()).any(|w| w == delim.as_bytes()))
    };
    let mut candidate = Cow::Borrowed(base);
    let mut n = 0u32;
    while occurs(&candidate) {
        n += 1;
        candidate = Cow::Owned(format!("{base}.{n}"));
    }
    candidate.into_owned()
}

#[cfg(test)]
mod tests;
