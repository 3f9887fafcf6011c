//! The message as `sendmail` reads it from stdin, made ready for SMTP:
//! lines end in CRLF whatever they ended in, a lone dot ends the input
//! unless `-i`, `Bcc:` fields are removed, a `From:` is added when there is
//! none, and with `-t` the recipients come from the header fields.
//!
//! Invariants:
//! - The body's bytes are kept as they came, line ends aside (a message
//!   written with LF arrives with CRLF, which is what it means in SMTP).
//! - Addresses are parsed by mail-parser, never here; this module only
//!   splits the header section into fields to drop `Bcc:`.
//!
//! Not here: dot-stuffing (the SMTP client's), `Date:` and `Message-ID:`
//! (the server adds them to every local message that lacks them).

use mail_builder::headers::Header;
use mail_builder::headers::address::Address;
use mail_parser::{HeaderName, MessageParser};

/// The message's lines with CRLF ends, cut at a line of a single dot when
/// `dot_ends` (Sendmail's default; `-i` turns it off).
pub fn normalize(input: &[u8], dot_ends: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len() + input.len() / 32);
    let mut lines = input.split(|&b| b == b'\n').peekable();
    while let Some(line) = lines.next() {
        // The piece after the last LF: empty when the input ends in one.
        if lines.peek().is_none() && line.is_empty() {
            break;
        }
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if dot_ends && line == b"." {
            break;
        }
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Where the header section of a CRLF message ends: the offset of the empty
/// line, or of the first line that is not a header field (then the body
/// starts there without one), and whether the empty line is there.
fn header_end(message: &[u8]) -> (usize, bool) {
    let mut at = 0;
    let mut in_field = false;
    while at < message.len() {
        let end = memchr::memmem::find(&message[at..], b"\r\n").map_or(message.len(), |i| at + i);
        let line = &message[at..end];
        if line.is_empty() {
            return (at, true);
        }
        let continuation = in_field && matches!(line[0], b' ' | b'\t');
        if !continuation && field_name(line).is_none() {
            return (at, false);
        }
        in_field = true;
        at = (end + 2).min(message.len());
    }
    (message.len(), false)
}

/// The name of the field a header line starts, if it starts one (RFC 5322
/// §3.6.8: printable ASCII but the colon, then a colon).
fn field_name(line: &[u8]) -> Option<&[u8]> {
    let colon = memchr::memchr(b':', line)?;
    let name = &line[..colon];
    (!name.is_empty() && name.iter().all(|&b| (33..=126).contains(&b))).then_some(name)
}

/// The header section split into fields, each with its continuation lines.
fn fields(header: &[u8]) -> Vec<&[u8]> {
    let mut out: Vec<&[u8]> = Vec::new();
    let mut start = 0;
    let mut at = 0;
    while at < header.len() {
        let end = memchr::memmem::find(&header[at..], b"\r\n").map_or(header.len(), |i| at + i + 2);
        if at > start && !matches!(header[at], b' ' | b'\t') {
            out.push(&header[start..at]);
            start = at;
        }
        at = end;
    }
    if start < header.len() {
        out.push(&header[start..]);
    }
    out
}

fn is_field(field: &[u8], name: &str) -> bool {
    field_name(field).is_some_and(|n| n.eq_ignore_ascii_case(name.as_bytes()))
}

/// What [`prepare`] makes of a message.
#[derive(Debug, PartialEq, Eq)]
pub struct Prepared {
    /// The message to send (CRLF lines, not dot-stuffed).
    pub content: Vec<u8>,
    /// With `-t`: the addresses of the destination fields, as written
    /// (unqualified ones too); otherwise empty.
    pub extracted: Vec<String>,
}

/// Readies a normalized message: with `extract`, the recipients of its
/// `To:`, `Cc:` and `Bcc:` fields (or of its `Resent-To:`, `Resent-Cc:`
/// and `Resent-Bcc:` when it has any: it is being resent, RFC 5322
/// §3.6.6); every `Bcc:` and `Resent-Bcc:` field removed (whoever gave the
/// recipients: a blind copy must stay blind); unqualified addresses of the
/// address fields given `@origin` (as Postfix does for its `sendmail`: a
/// reader elsewhere could not answer `root`); a `From:` field of `from`
/// (address, and full name) added when it has none.
pub fn prepare(
    message: &[u8],
    extract: bool,
    from: (&str, Option<&str>),
    origin: &str,
) -> Prepared {
    let (end, blank) = header_end(message);
    let (header, body) = message.split_at(end);
    let extracted = if extract {
        destinations(header)
    } else {
        Vec::new()
    };
    let kept: Vec<&[u8]> = fields(header)
        .into_iter()
        .filter(|f| !is_field(f, "bcc") && !is_field(f, "resent-bcc"))
        .collect();
    let mut content = Vec::with_capacity(message.len() + 128);
    if !kept.iter().any(|f| is_field(f, "from")) {
        let (address, name) = from;
        content.extend_from_slice(b"From: ");
        Address::new_address(name, address).write_header(&mut content, "From: ".len());
    }
    for field in kept {
        match qualified_field(field, origin) {
            Some(rewritten) => content.extend_from_slice(&rewritten),
            None => content.extend_from_slice(field),
        }
    }
    if !blank && !body.is_empty() {
        // The first line was not a header field: it starts the body, which
        // needs the empty line before it (RFC 5322 §2.1).
        content.extend_from_slice(b"\r\n");
    }
    content.extend_from_slice(body);
    Prepared { content, extracted }
}

/// The fields whose addresses a reader answers or writes to.
const ADDRESS_FIELDS: [&str; 9] = [
    "from",
    "sender",
    "reply-to",
    "to",
    "cc",
    "resent-from",
    "resent-sender",
    "resent-to",
    "resent-cc",
];

/// `field` written anew with `@origin` on its unqualified addresses; None
/// when it has none (or is a group, or holds something that is not an
/// address): then it stays byte for byte as it came.
fn qualified_field(field: &[u8], origin: &str) -> Option<Vec<u8>> {
    let name = field_name(field)?;
    if !ADDRESS_FIELDS
        .iter()
        .any(|f| name.eq_ignore_ascii_case(f.as_bytes()))
    {
        return None;
    }
    let mut section = field.to_vec();
    section.extend_from_slice(b"\r\n");
    let parsed = MessageParser::default().parse_headers(&section)?;
    let mail_parser::Address::List(list) = parsed.headers().first()?.value.as_address()? else {
        return None;
    };
    let mut unqualified = false;
    let mut out = Vec::with_capacity(list.len());
    for addr in list {
        let address = address_of(addr)?;
        // A bare word came back as the name: it is the address itself.
        let name = addr.address.as_ref().and(addr.name.as_deref());
        if !address.contains('@') {
            unqualified = true;
        }
        out.push(Address::new_address(
            name.map(str::to_string),
            qualify(&address, origin),
        ));
    }
    if !unqualified {
        return None;
    }
    let mut rewritten = name.to_vec();
    rewritten.extend_from_slice(b": ");
    Address::new_list(out).write_header(&mut rewritten, name.len() + 2);
    Some(rewritten)
}

/// The addresses of the destination fields of `header`.
fn destinations(header: &[u8]) -> Vec<String> {
    let mut section = header.to_vec();
    section.extend_from_slice(b"\r\n");
    let Some(parsed) = MessageParser::default().parse_headers(&section) else {
        return Vec::new();
    };
    let resent = [
        HeaderName::ResentTo,
        HeaderName::ResentCc,
        HeaderName::ResentBcc,
    ];
    let plain = [HeaderName::To, HeaderName::Cc, HeaderName::Bcc];
    let resending = parsed.headers().iter().any(|h| resent.contains(&h.name));
    let names = if resending { resent } else { plain };
    let mut out = Vec::new();
    for h in parsed.headers() {
        if !names.contains(&h.name) {
            continue;
        }
        if let Some(list) = h.value.as_address() {
            out.extend(list.iter().filter_map(address_of));
        }
    }
    out
}

/// The addresses in one recipient argument: a comma list, display names
/// and angle brackets allowed (`"Root <root>, alice"`), as Sendmail takes.
pub fn argument_addresses(argument: &str) -> Vec<String> {
    let section = format!("To: {argument}\r\n\r\n");
    let Some(parsed) = MessageParser::default().parse_headers(section.as_bytes()) else {
        return Vec::new();
    };
    parsed
        .to()
        .map(|list| list.iter().filter_map(address_of).collect())
        .unwrap_or_default()
}

/// The address of one parsed mailbox. A bare local part (`root`, as cron
/// and scripts write) has no `@`, so mail-parser reads it as a display name
/// without an address: one word with nothing else is taken as the address,
/// to be qualified.
fn address_of(addr: &mail_parser::Addr) -> Option<String> {
    let address = match (addr.address.as_deref(), addr.name.as_deref()) {
        (Some(a), _) => a,
        (None, Some(word))
            if !word.trim().is_empty() && !word.trim().contains(char::is_whitespace) =>
        {
            word
        }
        _ => return None,
    };
    let address = address.trim();
    (!address.is_empty()).then(|| address.to_string())
}

/// `address` with `@origin` when it has no domain (`root`).
pub fn qualify(address: &str, origin: &str) -> String {
    if address.contains('@') {
        address.to_string()
    } else {
        format!("{address}@{origin}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(bytes: &[u8]) -> &str {
        std::str::from_utf8(bytes).unwrap()
    }

    #[test]
    fn line_ends_become_crlf_and_a_lone_dot_ends_unless_i() {
        assert_eq!(normalize(b"a\nb\r\nc", true), b"a\r\nb\r\nc\r\n");
        assert_eq!(normalize(b"a\n.\nafter\n", true), b"a\r\n");
        assert_eq!(normalize(b"a\n.\nafter\n", false), b"a\r\n.\r\nafter\r\n");
        assert_eq!(normalize(b"a\r\n.\r\nafter\r\n", true), b"a\r\n");
        assert_eq!(normalize(b"..x\n\n\n", true), b"..x\r\n\r\n\r\n");
        assert_eq!(normalize(b"", true), b"");
    }

    #[test]
    fn t_takes_to_cc_and_bcc_and_removes_bcc() {
        let msg = normalize(
            b"To: Alice <alice@example.test>, bob\nCc: \"Carol, C.\" <carol@example.test>\n\
              Bcc: dave@example.test,\n  erin@example.test\nSubject: hi\n\nBcc: body line\n",
            true,
        );
        let p = prepare(&msg, true, ("root@example.test", None), "example.test");
        assert_eq!(
            p.extracted,
            [
                "alice@example.test",
                "bob",
                "carol@example.test",
                "dave@example.test",
                "erin@example.test"
            ]
        );
        let out = text(&p.content);
        let (header, _) = out.split_once("\r\n\r\n").unwrap();
        assert!(!header.to_lowercase().contains("bcc:"), "{out}");
        assert!(!out.contains("erin"), "{out}");
        assert!(
            out.starts_with("From: <root@example.test>\r\nTo: \"Alice\" <alice@example.test>, <bob@example.test>\r\n"),
            "{out}"
        );
        assert!(
            out.ends_with("Subject: hi\r\n\r\nBcc: body line\r\n"),
            "{out}"
        );
    }

    #[test]
    fn resent_fields_win_when_present() {
        let msg = normalize(
            b"From: a@example.test\nTo: old@example.test\nResent-To: new@example.test\n\
              Resent-Bcc: hidden@example.test\n\nbody\n",
            true,
        );
        let p = prepare(&msg, true, ("x@example.test", None), "example.test");
        assert_eq!(p.extracted, ["new@example.test", "hidden@example.test"]);
        assert!(!text(&p.content).contains("hidden"));
    }

    #[test]
    fn bcc_is_removed_without_t_and_from_is_kept() {
        let msg = normalize(b"From: me@example.test\nBCC: x@example.test\n\nhi\n", true);
        let p = prepare(
            &msg,
            false,
            ("other@example.test", Some("Other")),
            "example.test",
        );
        assert!(p.extracted.is_empty());
        assert_eq!(text(&p.content), "From: me@example.test\r\n\r\nhi\r\n");
    }

    #[test]
    fn from_gets_the_full_name_encoded_when_needed() {
        let p = prepare(
            b"Subject: s\r\n\r\nx\r\n",
            false,
            ("root@example.test", Some("Cron Daemon")),
            "example.test",
        );
        assert!(
            text(&p.content)
                .starts_with("From: \"Cron Daemon\" <root@example.test>\r\nSubject: s\r\n"),
            "{}",
            text(&p.content)
        );
        let p = prepare(
            b"\r\nx\r\n",
            false,
            ("j@example.test", Some("Jörg")),
            "example.test",
        );
        let parsed = MessageParser::default().parse(&p.content).unwrap();
        let from = parsed.from().unwrap().first().unwrap();
        assert_eq!(from.name.as_deref(), Some("Jörg"));
        assert_eq!(from.address.as_deref(), Some("j@example.test"));
    }

    #[test]
    fn a_message_without_header_gets_the_empty_line_before_its_body() {
        let p = prepare(
            b"just text\r\nmore\r\n",
            false,
            ("r@example.test", None),
            "example.test",
        );
        assert_eq!(
            text(&p.content),
            "From: <r@example.test>\r\n\r\njust text\r\nmore\r\n"
        );
        let p = prepare(
            b"Subject: only\r\n",
            false,
            ("r@example.test", None),
            "example.test",
        );
        assert_eq!(
            text(&p.content),
            "From: <r@example.test>\r\nSubject: only\r\n"
        );
    }

    #[test]
    fn unqualified_header_addresses_get_the_origin() {
        let msg = normalize(
            b"To: root, Alice <alice>\nCc: bob@other.test\nReply-To: undisclosed:;\n\
              Subject: root\nX-Note: carol\n\nTo: body\n",
            true,
        );
        let p = prepare(&msg, false, ("me@example.test", None), "example.test");
        let out = text(&p.content);
        assert!(
            out.contains("\r\nTo: <root@example.test>, \"Alice\" <alice@example.test>\r\n"),
            "{out}"
        );
        // Qualified, group, and other fields stay byte for byte.
        assert!(out.contains("\r\nCc: bob@other.test\r\nReply-To: undisclosed:;\r\nSubject: root\r\nX-Note: carol\r\n\r\nTo: body\r\n"), "{out}");
    }

    #[test]
    fn arguments_may_be_lists_with_names() {
        assert_eq!(argument_addresses("root"), ["root"]);
        assert_eq!(
            argument_addresses("Root <root@example.test>, alice"),
            ["root@example.test", "alice"]
        );
        assert_eq!(qualify("root", "example.test"), "root@example.test");
        assert_eq!(qualify("a@b.test", "example.test"), "a@b.test");
    }
}
