//! ESMTP parameters of MAIL and RCPT (RFC 5321 §4.1.2 `Mail-parameters`,
//! `Rcpt-parameters`) for the extensions we advertise: SIZE (RFC 1870),
//! BODY (RFC 6152; BINARYMIME of RFC 3030 is not advertised), SMTPUTF8
//! (RFC 6531), RET/ENVID/NOTIFY/ORCPT (RFC 3461), AUTH (RFC 4954 §5), plus
//! xtext decoding (RFC 3461 §4).
//!
//! Invariants: keywords are case-insensitive; each may appear once; values
//! are decoded (xtext) before they are stored.
//!
//! Not done: checking SIZE against the configured limit and requiring EHLO
//! (the session does both).
//!
//! Errors: unknown or unadvertised keyword → `UnknownParameter` (555 5.5.4,
//! RFC 5321 §4.1.1.11); repeated or malformed → `BadParameter` (501 5.5.4).
//! `AUTH=` is the exception: never an error (see `MailParams::auth`).

use super::CommandError;

/// `BODY=` value (RFC 6152 §2, RFC 3030 §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyType {
    SevenBit,
    EightBitMime,
    /// Parsed for completeness; `MailParams::parse` refuses it because we do
    /// not advertise BINARYMIME.
    BinaryMime,
}

/// `RET=` (RFC 3461 §4.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ret {
    Full,
    Hdrs,
}

/// `NOTIFY=` (RFC 3461 §4.1): NEVER alone, or any of the other three.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Notify {
    pub never: bool,
    pub success: bool,
    pub failure: bool,
    pub delay: bool,
}

/// `ORCPT=addr-type;xtext` (RFC 3461 §4.2). `address` is decoded: xtext
/// `+XX` octets, and for the `utf-8` type (RFC 6533 §3) raw UTF-8 and
/// `\x{HEX}` escapes, so it is stored in one form whichever way it came.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Orcpt {
    pub addr_type: String,
    pub address: String,
    /// The value carried raw UTF-8 octets (utf-8-addr-unitext).
    pub raw_utf8: bool,
}

impl Orcpt {
    /// Whether only an SMTPUTF8 transaction may carry this ORCPT: raw
    /// UTF-8 needs it (RFC 6533 §3), and so does a non-ASCII address of any
    /// type but `utf-8`, whose escaped form is the one meant for 7-bit
    /// transactions.
    pub fn needs_smtputf8(&self) -> bool {
        self.raw_utf8 || (!self.address.is_ascii() && !self.addr_type.eq_ignore_ascii_case("utf-8"))
    }
}

/// Parameters of `MAIL FROM`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MailParams {
    /// Declared message size in octets (RFC 1870 §3); saturates at u64::MAX.
    pub size: Option<u64>,
    pub body: Option<BodyType>,
    /// `SMTPUTF8` was given (RFC 6531 §3.4).
    pub smtputf8: bool,
    pub ret: Option<Ret>,
    /// xtext-decoded `ENVID` (RFC 3461 §4.4).
    pub envid: Option<String>,
    /// `AUTH=` (RFC 4954 §5): the xtext-decoded mailbox the client says
    /// submitted the message, or `<>`. Never refused: a value that is not
    /// well-formed xtext, or a repeated one, reads as `<>` ("unknown"),
    /// which is what a server that does not trust the value must assume
    /// anyway. Trusting it is the driver's business.
    pub auth: Option<String>,
}

/// Parameters of `RCPT TO`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RcptParams {
    pub notify: Option<Notify>,
    pub orcpt: Option<Orcpt>,
}

/// RFC 3461 §4.4: ENVID at most 100 characters; §4.2: ORCPT at most 500.
const MAX_ENVID: usize = 100;
const MAX_ORCPT: usize = 500;

/// Splits `KEYWORD[=value]` and checks the esmtp-keyword / esmtp-value
/// grammar (§4.1.2; RFC 6531 §3.3 allows UTF-8 in values).
fn split_param(p: &str) -> Result<(String, Option<&str>), CommandError> {
    let (k, v) = match p.split_once('=') {
        Some((k, v)) => (k, Some(v)),
        None => (p, None),
    };
    let kw_ok = k.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if !kw_ok {
        return Err(CommandError::BadParameter("bad parameter syntax"));
    }
    if let Some(v) = v
        && (v.is_empty()
            || !v
                .bytes()
                .all(|b| matches!(b, 33..=60 | 62..=126) || b >= 0x80))
    {
        return Err(CommandError::BadParameter("bad parameter value"));
    }
    Ok((k.to_ascii_uppercase(), v))
}

fn set_once<T>(slot: &mut Option<T>, v: T) -> Result<(), CommandError> {
    if slot.is_some() {
        return Err(CommandError::BadParameter("duplicate parameter"));
    }
    *slot = Some(v);
    Ok(())
}

fn need<'a>(v: Option<&'a str>, what: &'static str) -> Result<&'a str, CommandError> {
    v.ok_or(CommandError::BadParameter(what))
}

impl MailParams {
    /// Parses the parameter words after `MAIL FROM:<...>`.
    pub fn parse(words: &[&str]) -> Result<MailParams, CommandError> {
        let mut out = MailParams::default();
        for w in words {
            if let Some(value) = auth_param(w) {
                out.auth = Some(match out.auth {
                    None => value,
                    Some(_) => AUTH_UNKNOWN.to_string(),
                });
                continue;
            }
            let (k, v) = split_param(w)?;
            match k.as_str() {
                "SIZE" => {
                    let v = need(v, "SIZE needs a number")?;
                    if v.len() > 20 || !v.bytes().all(|b| b.is_ascii_digit()) {
                        return Err(CommandError::BadParameter("bad SIZE value"));
                    }
                    // 1*20DIGIT can exceed u64: such a size is over any limit.
                    set_once(&mut out.size, v.parse().unwrap_or(u64::MAX))?;
                }
                "BODY" => {
                    let b = match need(v, "BODY needs a value")?.to_ascii_uppercase().as_str() {
                        "7BIT" => BodyType::SevenBit,
                        "8BITMIME" => BodyType::EightBitMime,
                        "BINARYMIME" => {
                            return Err(CommandError::UnknownParameter("BODY=BINARYMIME".into()));
                        }
                        _ => return Err(CommandError::BadParameter("bad BODY value")),
                    };
                    set_once(&mut out.body, b)?;
                }
                "SMTPUTF8" => {
                    if v.is_some() {
                        return Err(CommandError::BadParameter("SMTPUTF8 takes no value"));
                    }
                    if out.smtputf8 {
                        return Err(CommandError::BadParameter("duplicate parameter"));
                    }
                    out.smtputf8 = true;
                }
                "RET" => {
                    let r = match need(v, "RET needs a value")?.to_ascii_uppercase().as_str() {
                        "FULL" => Ret::Full,
                        "HDRS" => Ret::Hdrs,
                        _ => return Err(CommandError::BadParameter("bad RET value")),
                    };
                    set_once(&mut out.ret, r)?;
                }
                "ENVID" => {
                    let v = need(v, "ENVID needs a value")?;
                    if v.len() > MAX_ENVID {
                        return Err(CommandError::BadParameter("ENVID too long"));
                    }
                    let d = xtext_decode(v).ok_or(CommandError::BadParameter("bad ENVID xtext"))?;
                    // §4.4: printable US-ASCII before encoding.
                    if !d.bytes().all(|b| (32..=126).contains(&b)) {
                        return Err(CommandError::BadParameter("bad ENVID value"));
                    }
                    set_once(&mut out.envid, d)?;
                }
                _ => return Err(CommandError::UnknownParameter(k)),
            }
        }
        Ok(out)
    }

    /// True when no parameter was given (the only form allowed after HELO).
    pub fn is_empty(&self) -> bool {
        *self == MailParams::default()
    }
}

impl RcptParams {
    /// Parses the parameter words after `RCPT TO:<...>`.
    pub fn parse(words: &[&str]) -> Result<RcptParams, CommandError> {
        let mut out = RcptParams::default();
        for w in words {
            let (k, v) = split_param(w)?;
            match k.as_str() {
                "NOTIFY" => set_once(
                    &mut out.notify,
                    parse_notify(need(v, "NOTIFY needs a value")?)?,
                )?,
                "ORCPT" => set_once(
                    &mut out.orcpt,
                    parse_orcpt(need(v, "ORCPT needs a value")?)?,
                )?,
                _ => return Err(CommandError::UnknownParameter(k)),
            }
        }
        Ok(out)
    }

    /// True when no parameter was given.
    pub fn is_empty(&self) -> bool {
        *self == RcptParams::default()
    }
}

/// The `AUTH=` value that names nobody (RFC 4954 §5).
const AUTH_UNKNOWN: &str = "<>";

/// The value of an `AUTH` parameter word, if `w` is one: `auth-value =
/// xtext / "<>"` (RFC 4954 §5), decoded; anything else (no value, bad
/// xtext, octets xtext does not allow, a value that decodes to control
/// characters) reads as `<>`.
fn auth_param(w: &str) -> Option<String> {
    let (k, v) = w.split_once('=').unwrap_or((w, ""));
    if !k.eq_ignore_ascii_case("AUTH") {
        return None;
    }
    let decoded = match v {
        AUTH_UNKNOWN => None,
        v => xtext_decode(v).filter(|d| !d.is_empty() && !d.chars().any(char::is_control)),
    };
    Some(decoded.unwrap_or_else(|| AUTH_UNKNOWN.to_string()))
}

/// `"NEVER" / 1#( "SUCCESS" / "FAILURE" / "DELAY" )` (RFC 3461 §4.1).
fn parse_notify(v: &str) -> Result<Notify, CommandError> {
    let mut n = Notify::default();
    for item in v.split(',') {
        match item.to_ascii_uppercase().as_str() {
            "NEVER" => n.never = true,
            "SUCCESS" => n.success = true,
            "FAILURE" => n.failure = true,
            "DELAY" => n.delay = true,
            _ => return Err(CommandError::BadParameter("bad NOTIFY value")),
        }
    }
    if n.never && (n.success || n.failure || n.delay) {
        return Err(CommandError::BadParameter(
            "NOTIFY=NEVER cannot be combined",
        ));
    }
    Ok(n)
}

/// `addr-type ";" xtext` (RFC 3461 §4.2); addr-type is an atom.
fn parse_orcpt(v: &str) -> Result<Orcpt, CommandError> {
    const BAD: CommandError = CommandError::BadParameter("bad ORCPT value");
    if v.len() > MAX_ORCPT {
        return Err(CommandError::BadParameter("ORCPT too long"));
    }
    let (t, a) = v.split_once(';').ok_or(BAD)?;
    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(BAD);
    }
    // RFC 6533 §3: only the "utf-8" address type may carry raw UTF-8
    // (utf-8-addr-unitext); every other type is plain xtext (RFC 3461 §4).
    // Whether SMTPUTF8 is in use is the session's check.
    let utf8_type = t.eq_ignore_ascii_case("utf-8");
    let address = decode(a, utf8_type).ok_or(BAD)?;
    if address.is_empty() || address.chars().any(char::is_control) {
        return Err(BAD);
    }
    Ok(Orcpt {
        addr_type: t.to_string(),
        address,
        raw_utf8: !a.is_ascii(),
    })
}

/// Decodes xtext (RFC 3461 §4): `xchar` is `!`..`~` except `+` and `=`;
/// `+XX` (upper-case hex) is one octet. Returns `None` when malformed
/// (including any raw octet outside `!`..`~`) or when the decoded octets
/// are not UTF-8.
pub fn xtext_decode(s: &str) -> Option<String> {
    decode(s, false)
}

/// xtext; for the `utf-8` address type (RFC 6533 §3) also raw UTF-8
/// (utf-8-addr-unitext) and `\x{HEX}` code points (EmbeddedUnicodeChar),
/// where a `\` that starts no such escape is malformed.
fn decode(s: &str, utf8_type: bool) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' if utf8_type => {
                let (c, len) = embedded_unicode_char(&b[i..])?;
                let mut utf8 = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
                i += len;
            }
            b'+' => {
                let hex = |c: u8| match c {
                    b'0'..=b'9' => Some(c - b'0'),
                    b'A'..=b'F' => Some(c - b'A' + 10),
                    _ => None,
                };
                let hi = hex(*b.get(i + 1)?)?;
                let lo = hex(*b.get(i + 2)?)?;
                out.push(hi << 4 | lo);
                i += 3;
            }
            b'=' => return None,
            c @ 33..=126 => {
                out.push(c);
                i += 1;
            }
            c if c >= 0x80 && utf8_type => {
                out.push(c);
                i += 1;
            }
            _ => return None,
        }
    }
    String::from_utf8(out).ok()
}

/// `\x{HEXPOINT}` at the start of `b` (RFC 6533 §3): the code point and
/// the escape's length. HEXPOINT is 2 to 6 hex digits without leading
/// zeros beyond two, naming a Unicode scalar value.
fn embedded_unicode_char(b: &[u8]) -> Option<(char, usize)> {
    let rest = b.strip_prefix(b"\\x{")?;
    let end = rest.iter().position(|&c| c == b'}')?;
    let hex = &rest[..end];
    let canonical = (2..=6).contains(&hex.len())
        && hex.iter().all(u8::is_ascii_hexdigit)
        && (hex.len() == 2 || hex[0] != b'0');
    if !canonical {
        return None;
    }
    let value = u32::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?;
    Some((char::from_u32(value)?, 3 + end + 1))
}

/// Encodes text as xtext (RFC 3461 §4): the inverse of `xtext_decode`.
pub fn xtext_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (33..=126).contains(&b) && b != b'+' && b != b'=' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}
