//! RFC 5321 addresses: paths, mailboxes, domains and address literals, with
//! the RFC 6531 (SMTPUTF8) extensions.
//!
//! Grammar (RFC 5321 §4.1.2, §4.1.3): `Path = "<" [A-d-l ":"] Mailbox ">"`;
//! a local part is a Dot-string or a Quoted-string (with quoted-pairs); a
//! domain is sub-domains of letters, digits and inner hyphens, or an address
//! literal (IPv4, `IPv6:` in every RFC 4291 text form, or a
//! General-address-literal `tag:content`). Source routes (`<@a,@b:u@d>`) are
//! parsed and dropped (§4.1.2 and Appendix C say receivers must accept and
//! may ignore them). RFC 6531 §3.3 adds UTF-8 (non-ASCII) characters to atext,
//! qtext and domain labels (U-labels); the parser accepts them and
//! `Mailbox::is_utf8` tells the caller, who decides (the session refuses them
//! without `SMTPUTF8`).
//!
//! Invariants: `Mailbox::local_part` is the semantic value (quotes removed,
//! quoted-pairs unescaped) and `Display` re-quotes it when it is not a
//! Dot-string, so `parse(format(m)) == m`. `Domain::AddressLiteral` keeps the
//! brackets. Limits of §4.5.3.1: local part ≤ 64 octets (as sent), domain
//! ≤ 255 octets, path ≤ 256 octets including `<` and `>`.
//!
//! Not done: IDNA validation or A-label/U-label conversion, case folding,
//! deciding whether a domain is ours.
//!
//! Errors: [`AddressError`], one variant per reply the session gives.

use std::fmt;
use std::str::FromStr;

/// The part after `@`, or an EHLO/HELO argument.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Domain {
    /// A host name, as sent (case preserved, may hold U-labels).
    Name(String),
    /// An address literal with its brackets, e.g. `[127.0.0.1]`, `[IPv6:::1]`.
    AddressLiteral(String),
}

impl Domain {
    /// The text form: the name, or the literal with brackets.
    pub fn as_str(&self) -> &str {
        match self {
            Domain::Name(s) | Domain::AddressLiteral(s) => s,
        }
    }
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `local-part@domain`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Mailbox {
    /// Semantic value: quotes removed, quoted-pairs unescaped.
    pub local_part: String,
    pub domain: Domain,
}

impl Mailbox {
    /// True when the local part or the domain holds non-ASCII characters
    /// (RFC 6531: such an address needs `SMTPUTF8`).
    pub fn is_utf8(&self) -> bool {
        !self.local_part.is_ascii() || !self.domain.as_str().is_ascii()
    }

    /// The domain as text: the name, or the literal with brackets.
    pub fn domain_str(&self) -> &str {
        self.domain.as_str()
    }
}

impl fmt::Display for Mailbox {
    /// RFC 5321 wire form: the local part is quoted when it is not a
    /// Dot-string (§4.1.2), escaping `"` and `\` as quoted-pairs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if is_dot_string(&self.local_part) {
            f.write_str(&self.local_part)?;
        } else {
            let mut q = String::with_capacity(self.local_part.len() + 2);
            q.push('"');
            for c in self.local_part.chars() {
                if c == '"' || c == '\\' {
                    q.push('\\');
                }
                q.push(c);
            }
            q.push('"');
            f.write_str(&q)?;
        }
        write!(f, "@{}", self.domain)
    }
}

impl FromStr for Mailbox {
    type Err = AddressError;
    /// Parses a bare `local@domain` (no angle brackets).
    fn from_str(s: &str) -> Result<Mailbox, AddressError> {
        let mut p = Parser::new(s);
        let m = p.mailbox()?;
        if !p.at_end() {
            return Err(AddressError::Syntax(
                "unexpected characters after the address",
            ));
        }
        Ok(m)
    }
}

/// `MAIL FROM` argument: `<>` (the null path, used by bounces) or a mailbox.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ReversePath {
    Null,
    Mailbox(Mailbox),
}

impl fmt::Display for ReversePath {
    /// Wire form with brackets: `<>` or `<a@b>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReversePath::Null => f.write_str("<>"),
            ReversePath::Mailbox(m) => write!(f, "<{m}>"),
        }
    }
}

/// `RCPT TO` argument. A bare `<Postmaster>` (any case, no domain) is the
/// special recipient every server must accept (RFC 5321 §4.1.1.3, §4.5.1).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ForwardPath {
    Postmaster,
    Mailbox(Mailbox),
}

impl ForwardPath {
    /// True for a UTF-8 mailbox (never for `Postmaster`).
    pub fn is_utf8(&self) -> bool {
        matches!(self, ForwardPath::Mailbox(m) if m.is_utf8())
    }
}

impl fmt::Display for ForwardPath {
    /// Wire form with brackets: `<Postmaster>` or `<a@b>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ForwardPath::Postmaster => f.write_str("<Postmaster>"),
            ForwardPath::Mailbox(m) => write!(f, "<{m}>"),
        }
    }
}

/// Why an address was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddressError {
    /// Does not match the RFC 5321 grammar; the text says where.
    Syntax(&'static str),
    /// Local part longer than 64 octets (§4.5.3.1.1).
    LocalPartTooLong,
    /// Domain longer than 255 octets (§4.5.3.1.2).
    DomainTooLong,
    /// Path longer than 256 octets (§4.5.3.1.3).
    PathTooLong,
}

impl fmt::Display for AddressError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AddressError::Syntax(s) => write!(f, "bad address syntax: {s}"),
            AddressError::LocalPartTooLong => f.write_str("local part too long"),
            AddressError::DomainTooLong => f.write_str("domain too long"),
            AddressError::PathTooLong => f.write_str("path too long"),
        }
    }
}

impl std::error::Error for AddressError {}

/// Limits from RFC 5321 §4.5.3.1.
pub const MAX_LOCAL_PART: usize = 64;
pub const MAX_DOMAIN: usize = 255;
pub const MAX_PATH: usize = 256;

/// Parses a reverse-path at the start of `s` (which must start with `<`);
/// returns it and the bytes consumed.
pub fn parse_reverse_path(s: &str) -> Result<(ReversePath, usize), AddressError> {
    if s.starts_with("<>") {
        return Ok((ReversePath::Null, 2));
    }
    let (m, n) = parse_path(s)?;
    Ok((ReversePath::Mailbox(m), n))
}

/// Parses a forward-path at the start of `s` (which must start with `<`);
/// returns it and the bytes consumed.
pub fn parse_forward_path(s: &str) -> Result<(ForwardPath, usize), AddressError> {
    const PM: &str = "<postmaster>";
    if s.len() >= PM.len() && s.as_bytes()[..PM.len()].eq_ignore_ascii_case(PM.as_bytes()) {
        return Ok((ForwardPath::Postmaster, PM.len()));
    }
    let (m, n) = parse_path(s)?;
    Ok((ForwardPath::Mailbox(m), n))
}

/// Parses a whole string as a Domain or an address literal (the EHLO/HELO
/// argument, RFC 5321 §4.1.1.1).
pub fn parse_domain(s: &str) -> Result<Domain, AddressError> {
    let mut p = Parser::new(s);
    let d = p.domain_or_literal()?;
    if !p.at_end() {
        return Err(AddressError::Syntax(
            "unexpected characters after the domain",
        ));
    }
    Ok(d)
}

fn parse_path(s: &str) -> Result<(Mailbox, usize), AddressError> {
    let mut p = Parser::new(s);
    p.expect(b'<', "missing '<'")?;
    if p.peek() == Some(b'@') {
        p.source_route()?;
    }
    let m = p.mailbox()?;
    if p.peek().is_some_and(|b| b != b'>') {
        // The mailbox grammar stopped early: say so, rather than blame a
        // missing bracket that is in fact there.
        return Err(AddressError::Syntax("character not allowed in the address"));
    }
    p.expect(b'>', "missing '>'")?;
    if p.pos > MAX_PATH {
        return Err(AddressError::PathTooLong);
    }
    Ok((m, p.pos))
}

/// atext (RFC 5322 §3.2.3) plus UTF8-non-ascii (RFC 6531 §3.3): since the
/// input is a `&str`, every byte ≥ 0x80 belongs to a valid UTF-8 character.
fn is_atext(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&b) || b >= 0x80
}

/// qtextSMTP (§4.1.2) plus UTF8-non-ascii: printable ASCII and space except
/// `"` and `\`.
fn is_qtext(b: u8) -> bool {
    matches!(b, 32..=33 | 35..=91 | 93..=126) || b >= 0x80
}

/// dcontent (§4.1.3): printable ASCII except `[`, `\`, `]`.
fn is_dcontent(b: u8) -> bool {
    matches!(b, 33..=90 | 94..=126)
}

fn is_dot_string(s: &str) -> bool {
    !s.is_empty()
        && s.split('.')
            .all(|atom| !atom.is_empty() && atom.bytes().all(is_atext))
}

struct Parser<'a> {
    s: &'a str,
    pos: usize,
}

impl<'a> Parser<'a> {
    fn new(s: &'a str) -> Self {
        Parser { s, pos: 0 }
    }

    fn peek(&self) -> Option<u8> {
        self.s.as_bytes().get(self.pos).copied()
    }

    fn at_end(&self) -> bool {
        self.pos >= self.s.len()
    }

    fn expect(&mut self, b: u8, what: &'static str) -> Result<(), AddressError> {
        if self.peek() == Some(b) {
            self.pos += 1;
            Ok(())
        } else {
            Err(AddressError::Syntax(what))
        }
    }

    /// `A-d-l ":"`: `@dom *("," @dom) ":"`, parsed for syntax and dropped.
    fn source_route(&mut self) -> Result<(), AddressError> {
        loop {
            self.expect(b'@', "bad source route")?;
            self.domain_or_literal()?;
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b':') => {
                    self.pos += 1;
                    return Ok(());
                }
                _ => return Err(AddressError::Syntax("bad source route")),
            }
        }
    }

    fn mailbox(&mut self) -> Result<Mailbox, AddressError> {
        let start = self.pos;
        let local_part = if self.peek() == Some(b'"') {
            self.quoted_string()?
        } else {
            self.dot_string()?
        };
        if self.pos - start > MAX_LOCAL_PART {
            return Err(AddressError::LocalPartTooLong);
        }
        self.expect(b'@', "missing '@' or bad local part")?;
        let domain = self.domain_or_literal()?;
        Ok(Mailbox { local_part, domain })
    }

    fn dot_string(&mut self) -> Result<String, AddressError> {
        let start = self.pos;
        loop {
            let atom_start = self.pos;
            while self.peek().is_some_and(is_atext) {
                self.pos += 1;
            }
            if self.pos == atom_start {
                return Err(AddressError::Syntax("bad local part"));
            }
            if self.peek() != Some(b'.') {
                break;
            }
            self.pos += 1;
        }
        Ok(self.s[start..self.pos].to_string())
    }

    fn quoted_string(&mut self) -> Result<String, AddressError> {
        self.expect(b'"', "missing '\"'")?;
        let mut out = String::new();
        loop {
            let run = self.pos;
            while self.peek().is_some_and(is_qtext) {
                self.pos += 1;
            }
            out.push_str(&self.s[run..self.pos]);
            match self.peek() {
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(out);
                }
                // quoted-pairSMTP = "\" %d32-126 (§4.1.2)
                Some(b'\\') => match self.s.as_bytes().get(self.pos + 1) {
                    Some(&c @ 32..=126) => {
                        out.push(char::from(c));
                        self.pos += 2;
                    }
                    _ => return Err(AddressError::Syntax("bad quoted-pair")),
                },
                _ => return Err(AddressError::Syntax("bad quoted string")),
            }
        }
    }

    fn domain_or_literal(&mut self) -> Result<Domain, AddressError> {
        let start = self.pos;
        let d = if self.peek() == Some(b'[') {
            self.address_literal()?
        } else {
            self.domain_name()?
        };
        if self.pos - start > MAX_DOMAIN {
            return Err(AddressError::DomainTooLong);
        }
        Ok(d)
    }

    /// `sub-domain *("." sub-domain)`; a sub-domain is `Let-dig [Ldh-str]`
    /// (§4.1.2) or a U-label (RFC 6531 §3.3).
    fn domain_name(&mut self) -> Result<Domain, AddressError> {
        let start = self.pos;
        loop {
            let label_start = self.pos;
            while self
                .peek()
                .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'-' || b >= 0x80)
            {
                self.pos += 1;
            }
            let label = &self.s.as_bytes()[label_start..self.pos];
            match (label.first(), label.last()) {
                (Some(b'-'), _) | (_, Some(b'-')) => {
                    return Err(AddressError::Syntax("domain label starts or ends with '-'"));
                }
                (None, _) => return Err(AddressError::Syntax("empty domain label")),
                _ => {}
            }
            // RFC 1035 §2.3.4; only checked for ASCII labels, whose length
            // on the DNS wire we know.
            if label.len() > 63 && label.is_ascii() {
                return Err(AddressError::Syntax("domain label longer than 63"));
            }
            if self.peek() != Some(b'.') {
                break;
            }
            self.pos += 1;
        }
        Ok(Domain::Name(self.s[start..self.pos].to_string()))
    }

    /// `"[" (IPv4 / "IPv6:" IPv6 / tag ":" 1*dcontent) "]"` (§4.1.3).
    fn address_literal(&mut self) -> Result<Domain, AddressError> {
        let start = self.pos;
        self.expect(b'[', "missing '['")?;
        let inner_start = self.pos;
        while self.peek().is_some_and(is_dcontent) {
            self.pos += 1;
        }
        let inner = &self.s[inner_start..self.pos];
        self.expect(b']', "bad address literal")?;
        check_literal(inner)?;
        Ok(Domain::AddressLiteral(self.s[start..self.pos].to_string()))
    }
}

fn check_literal(inner: &str) -> Result<(), AddressError> {
    const BAD: AddressError = AddressError::Syntax("bad address literal");
    if inner.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return if is_ipv4(inner) { Ok(()) } else { Err(BAD) };
    }
    let (tag, rest) = inner.split_once(':').ok_or(BAD)?;
    if tag.eq_ignore_ascii_case("IPv6") {
        return if is_ipv6(rest) { Ok(()) } else { Err(BAD) };
    }
    // General-address-literal: Standardized-tag is an Ldh-str, which must
    // end in a letter or digit; content is 1*dcontent.
    let ldh = tag.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    let ends_ok = tag
        .bytes()
        .last()
        .is_some_and(|b| b.is_ascii_alphanumeric());
    if ldh && ends_ok && !rest.is_empty() {
        Ok(())
    } else {
        Err(BAD)
    }
}

/// `Snum 3("." Snum)`, Snum = 1*3DIGIT in 0..=255 (leading zeros allowed).
fn is_ipv4(s: &str) -> bool {
    let parts: Vec<&str> = s.split('.').collect();
    parts.len() == 4
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.len() <= 3
                && p.bytes().all(|b| b.is_ascii_digit())
                && p.parse::<u16>().is_ok_and(|n| n <= 255)
        })
}

/// IPv6-full / -comp / v4-full / v4-comp of §4.1.3, which are the RFC 4291
/// text forms; `core::net` parses them (pure code, no sockets). §4.1.3 also
/// says `::` stands for at least two groups, which `core::net` does not
/// enforce, so the group count is checked here.
fn is_ipv6(s: &str) -> bool {
    if s.parse::<core::net::Ipv6Addr>().is_err() {
        return false;
    }
    if !s.contains("::") {
        return true;
    }
    let v4 = s.contains('.');
    let groups = s.split(':').filter(|g| !g.is_empty()).count();
    // With a trailing IPv4 part (two groups' worth, counted as one here),
    // at most 4 hex groups may accompany "::"; without, at most 6.
    if v4 { groups <= 5 } else { groups <= 6 }
}

#[cfg(test)]
#[path = "address_tests.rs"]
mod tests;
