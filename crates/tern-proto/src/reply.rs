//! SMTP replies: the value type, its wire encoding and (for the client side)
//! its parser.
//!
//! A reply is a three-digit code (RFC 5321 §4.2), an optional enhanced
//! status code (RFC 2034 / RFC 3463) and one or more text lines. On the wire
//! every line but the last uses `code-` and the last uses `code ` (§4.2.1);
//! when an enhanced code is present it is repeated at the start of the text
//! of every line (RFC 2034 §4).
//!
//! Invariants: `Reply::new` never stores CR or LF inside a line (text is split
//! on LF and CRs are dropped), so `to_bytes` always produces well-formed
//! lines. `Reply::parse(r.to_bytes())` gives `r` back for any reply with at
//! least one line whose code is 200..=599.
//!
//! Not done here: choosing which reply to send (see `server`), line-length
//! limits on the text we format (replies we build are short by construction).
//!
//! Errors: [`ReplyParseError`] from `Reply::parse` — `Incomplete` when more
//! input is needed, the other variants when the peer sent something that is
//! not an SMTP reply.

use std::fmt;

/// Enhanced mail system status code `class.subject.detail` (RFC 3463 §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EnhancedCode(pub u8, pub u16, pub u16);

impl fmt::Display for EnhancedCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

impl EnhancedCode {
    /// Parses `d.ddd.ddd` (RFC 3463 §2: class 2, 4 or 5; subject and detail
    /// 1 to 3 digits). Returns `None` for anything else.
    pub fn parse(s: &str) -> Option<EnhancedCode> {
        let mut it = s.split('.');
        let class = it.next()?;
        let subject = it.next()?;
        let detail = it.next()?;
        if it.next().is_some() || class.len() != 1 {
            return None;
        }
        let class: u8 = parse_digits(class, 1)? as u8;
        if !matches!(class, 2 | 4 | 5) {
            return None;
        }
        Some(EnhancedCode(
            class,
            parse_digits(subject, 3)?,
            parse_digits(detail, 3)?,
        ))
    }
}

fn parse_digits(s: &str, max_len: usize) -> Option<u16> {
    if s.is_empty() || s.len() > max_len || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// One SMTP reply (possibly multi-line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Three-digit reply code, 200..=599 for anything we send.
    pub code: u16,
    /// Enhanced status code, written at the start of every line when present.
    pub enhanced: Option<EnhancedCode>,
    /// Text lines without code, enhanced code or CRLF. Never contain CR/LF.
    pub lines: Vec<String>,
}

/// Why `Reply::parse` failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyParseError {
    /// The input ends before the last line of the reply: read more.
    Incomplete,
    /// A line does not start with three digits followed by SP, `-` or CRLF.
    Syntax,
    /// The lines of one multi-line reply carry different codes (§4.2.1).
    CodeMismatch,
    /// A single line is longer than [`MAX_REPLY_LINE`] bytes.
    LineTooLong,
}

impl fmt::Display for ReplyParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            ReplyParseError::Incomplete => "incomplete reply",
            ReplyParseError::Syntax => "malformed reply line",
            ReplyParseError::CodeMismatch => "reply lines carry different codes",
            ReplyParseError::LineTooLong => "reply line too long",
        };
        f.write_str(s)
    }
}

impl std::error::Error for ReplyParseError {}

/// Longest reply line the parser accepts (RFC 5321 §4.5.3.1.5 says 512
/// including CRLF; we allow more because real servers exceed it).
pub const MAX_REPLY_LINE: usize = 4096;

impl Reply {
    /// Builds a reply; `text` is split into lines on LF, CRs are dropped.
    pub fn new(code: u16, enhanced: Option<EnhancedCode>, text: impl Into<String>) -> Reply {
        let text = text.into();
        let lines = text.split('\n').map(|l| l.replace('\r', "")).collect();
        Reply {
            code,
            enhanced,
            lines,
        }
    }

    /// A reply with an enhanced status code given as (class, subject,
    /// detail), the form every reply after the greeting takes (RFC 2034).
    pub fn enhanced(code: u16, status: (u8, u16, u16), text: impl Into<String>) -> Reply {
        Reply::new(code, Some(EnhancedCode(status.0, status.1, status.2)), text)
    }

    /// The wire form, every line ended by CRLF.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(16 + self.lines.iter().map(|l| l.len() + 16).sum::<usize>());
        let empty = [String::new()];
        let lines: &[String] = if self.lines.is_empty() {
            &empty
        } else {
            &self.lines
        };
        for (i, line) in lines.iter().enumerate() {
            let sep = if i + 1 == lines.len() { ' ' } else { '-' };
            let mut head = format!("{:03}", self.code);
            let mut text = String::new();
            if let Some(e) = self.enhanced {
                text.push_str(&e.to_string());
                if !line.is_empty() {
                    text.push(' ');
                }
            }
            text.push_str(line);
            // "250" alone is a valid last line (§4.2: textstring is optional);
            // a continuation line always needs its "-", and an empty AUTH
            // challenge its SP (RFC 4954 §4: continue-req = "334" SP [base64]).
            if !text.is_empty() || sep == '-' || self.code == 334 {
                head.push(sep);
            }
            out.extend_from_slice(head.as_bytes());
            out.extend_from_slice(text.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out
    }

    /// 2xx or 3xx.
    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    /// 4xx: transient negative completion (§4.2.1).
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    /// 5xx: permanent negative completion (§4.2.1).
    pub fn is_permanent(&self) -> bool {
        (500..600).contains(&self.code)
    }

    /// Parses one complete (possibly multi-line) reply from the start of
    /// `input`; returns it and the number of bytes consumed. Lines may end in
    /// CRLF or, leniently on the client side, a bare LF.
    pub fn parse(input: &[u8]) -> Result<(Reply, usize), ReplyParseError> {
        let mut pos = 0;
        let mut code = None;
        let mut raw_lines: Vec<String> = Vec::new();
        loop {
            let rest = &input[pos..];
            let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
                return Err(if rest.len() > MAX_REPLY_LINE {
                    ReplyParseError::LineTooLong
                } else {
                    incomplete_or_syntax(rest)
                });
            };
            if nl > MAX_REPLY_LINE {
                return Err(ReplyParseError::LineTooLong);
            }
            let mut line = &rest[..nl];
            if let Some(l) = line.strip_suffix(b"\r") {
                line = l;
            }
            pos += nl + 1;
            let (c, last, text) = parse_line(line)?;
            match code {
                None => code = Some(c),
                Some(prev) if prev != c => return Err(ReplyParseError::CodeMismatch),
                Some(_) => {}
            }
            raw_lines.push(text);
            if last {
                break;
            }
        }
        let code = code.ok_or(ReplyParseError::Syntax)?;
        Ok((split_enhanced(code, raw_lines), pos))
    }
}

/// A partial first line that already cannot be a reply is a syntax error
/// right away, so a client does not wait for more input from a non-SMTP peer.
fn incomplete_or_syntax(partial: &[u8]) -> ReplyParseError {
    let digits = partial.iter().take(3).all(|b| b.is_ascii_digit());
    let sep_ok = partial.len() < 4 || matches!(partial[3], b' ' | b'-' | b'\r');
    if digits && sep_ok {
        ReplyParseError::Incomplete
    } else {
        ReplyParseError::Syntax
    }
}

/// One line: returns (code, is_last, text).
fn parse_line(line: &[u8]) -> Result<(u16, bool, String), ReplyParseError> {
    if line.len() < 3 || !line[..3].iter().all(|b| b.is_ascii_digit()) {
        return Err(ReplyParseError::Syntax);
    }
    let code = u16::from(line[0] - b'0') * 100
        + u16::from(line[1] - b'0') * 10
        + u16::from(line[2] - b'0');
    if !(200..600).contains(&code) {
        return Err(ReplyParseError::Syntax);
    }
    let (last, text) = match line.get(3) {
        None => (true, &line[3..3]),
        Some(b' ') => (true, &line[4..]),
        Some(b'-') => (false, &line[4..]),
        Some(_) => return Err(ReplyParseError::Syntax),
    };
    Ok((code, last, String::from_utf8_lossy(text).into_owned()))
}

/// Takes the enhanced code off every line when the first line carries one
/// whose class matches the reply code (RFC 2034 §4).
fn split_enhanced(code: u16, raw: Vec<String>) -> Reply {
    let first = raw.first().map(String::as_str).unwrap_or("");
    let token = first.split(' ').next().unwrap_or("");
    let enhanced = EnhancedCode::parse(token).filter(|e| u16::from(e.0) == code / 100);
    let Some(e) = enhanced else {
        return Reply {
            code,
            enhanced: None,
            lines: raw,
        };
    };
    let prefix = e.to_string();
    let lines = raw
        .into_iter()
        .map(|l| match l.strip_prefix(prefix.as_str()) {
            Some("") => String::new(),
            Some(rest) if rest.starts_with(' ') => rest[1..].to_string(),
            _ => l,
        })
        .collect();
    Reply {
        code,
        enhanced: Some(e),
        lines,
    }
}

impl fmt::Display for Reply {
    /// The wire form without the final CRLF (lines joined by CRLF).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bytes = self.to_bytes();
        let s = String::from_utf8_lossy(&bytes);
        f.write_str(s.strip_suffix("\r\n").unwrap_or(&s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn formats_multiline_with_enhanced_on_every_line() {
        let r = Reply::new(250, Some(EnhancedCode(2, 1, 0)), "a\nb");
        assert_eq!(r.to_bytes(), b"250-2.1.0 a\r\n250 2.1.0 b\r\n");
        assert_eq!(r.to_string(), "250-2.1.0 a\r\n250 2.1.0 b");
        assert!(r.is_positive() && !r.is_transient() && !r.is_permanent());
    }

    #[test]
    fn formats_code_only() {
        let r = Reply::new(250, None, "");
        assert_eq!(r.to_bytes(), b"250\r\n");
        assert_eq!(Reply::parse(b"250\r\n"), Ok((r, 5)));
        // An empty AUTH challenge keeps its space (RFC 4954 §4).
        let r = Reply::new(334, None, "");
        assert_eq!(r.to_bytes(), b"334 \r\n");
        assert_eq!(Reply::parse(b"334 \r\n"), Ok((r, 6)));
    }

    #[test]
    fn parses_multiline_and_reports_consumed() {
        let input = b"250-mx.example Hello\r\n250-PIPELINING\r\n250 SIZE 100\r\nNEXT";
        let (r, n) = Reply::parse(input).unwrap();
        assert_eq!(n, input.len() - 4);
        assert_eq!(r.code, 250);
        assert_eq!(r.enhanced, None);
        assert_eq!(r.lines, vec!["mx.example Hello", "PIPELINING", "SIZE 100"]);
    }

    #[test]
    fn parses_enhanced_codes() {
        let (r, _) = Reply::parse(b"550-5.1.1 no\r\n550 5.1.1 such user\r\n").unwrap();
        assert_eq!(r.enhanced, Some(EnhancedCode(5, 1, 1)));
        assert_eq!(r.lines, vec!["no", "such user"]);
        // Class must match the reply code; otherwise it is just text.
        let (r, _) = Reply::parse(b"250 5.1.1 x\r\n").unwrap();
        assert_eq!(r.enhanced, None);
    }

    #[test]
    fn parse_errors() {
        assert_eq!(
            Reply::parse(b"250-a\r\n250 b"),
            Err(ReplyParseError::Incomplete)
        );
        assert_eq!(Reply::parse(b"25"), Err(ReplyParseError::Incomplete));
        assert_eq!(Reply::parse(b"HTTP/1.1 400"), Err(ReplyParseError::Syntax));
        assert_eq!(
            Reply::parse(b"250-a\r\n251 b\r\n"),
            Err(ReplyParseError::CodeMismatch)
        );
        assert_eq!(Reply::parse(b"250xa\r\n"), Err(ReplyParseError::Syntax));
        assert_eq!(Reply::parse(b"100 a\r\n"), Err(ReplyParseError::Syntax));
        assert_eq!(
            Reply::parse(&[b'2'; 5000]),
            Err(ReplyParseError::LineTooLong)
        );
    }

    #[test]
    fn enhanced_code_parse() {
        assert_eq!(EnhancedCode::parse("4.7.0"), Some(EnhancedCode(4, 7, 0)));
        assert_eq!(
            EnhancedCode::parse("5.123.999"),
            Some(EnhancedCode(5, 123, 999))
        );
        assert_eq!(EnhancedCode::parse("3.1.0"), None);
        assert_eq!(EnhancedCode::parse("5.1"), None);
        assert_eq!(EnhancedCode::parse("5.1.1000"), None);
        assert_eq!(EnhancedCode(2, 1, 0).to_string(), "2.1.0");
    }

    fn arb_reply() -> impl Strategy<Value = Reply> {
        let code = 200u16..600;
        let line = "[ -~]{0,40}".prop_map(|s| s.trim_start().to_string());
        (
            code,
            any::<bool>(),
            0u16..1000,
            0u16..1000,
            prop::collection::vec(line, 1..5),
        )
            .prop_map(|(code, enh, s, d, lines)| {
                // Enhanced codes exist only for classes 2, 4 and 5 (RFC 3463 §2).
                let enhanced =
                    (enh && code / 100 != 3).then_some(EnhancedCode((code / 100) as u8, s, d));
                Reply {
                    code,
                    enhanced,
                    lines,
                }
            })
            // A first line that itself looks like an enhanced code would be
            // read back as one; that is inherent in the format.
            .prop_filter("ambiguous", |r| {
                r.enhanced.is_some()
                    || EnhancedCode::parse(r.lines[0].split(' ').next().unwrap_or("")).is_none()
            })
    }

    proptest! {
        #[test]
        fn to_bytes_then_parse_round_trips(r in arb_reply()) {
            let bytes = r.to_bytes();
            let (back, n) = Reply::parse(&bytes).unwrap();
            prop_assert_eq!(n, bytes.len());
            prop_assert_eq!(back, r);
        }

        #[test]
        fn parse_never_panics(input in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = Reply::parse(&input);
        }
    }
}
