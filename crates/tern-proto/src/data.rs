//! Message content framing and checks for DATA (RFC 5321 §4.1.1.4, §4.5.2)
//! and BDAT (RFC 3030).
//!
//! [`ContentDecoder`] consumes raw content bytes incrementally and appends
//! the message (dot-unstuffed in DATA mode) to a caller's buffer, so the
//! session never holds a whole message.
//!
//! Invariants (these are what make SMTP smuggling impossible):
//! - Only CR LF ends a line. In DATA mode only `CRLF "." CRLF` (or `.` CRLF
//!   as the very first line) ends the content. A bare LF or bare CR is never
//!   a line end: `\n.\n`, `\n.\r\n`, `\r\n.\n`, `\r.\r`, `\r\n.\r` are content.
//! - Under [`BareLfPolicy::Reject`] a bare CR/LF marks the message bad (it is
//!   read to its real end, then refused); under `Normalize` each bare CR or
//!   LF is emitted as CRLF, which still never ends the content.
//! - A NUL octet is never emitted: under [`NulPolicy::Reject`] it marks the
//!   message bad, under `Strip` it is dropped. A NUL is content like any
//!   other octet for framing: `<CRLF>NUL.<CRLF>` does not end DATA.
//! - Once a problem is found, no more output is produced; the first problem
//!   found is the one reported.
//! - Memory is constant: a few counters and a 16-byte header prefix. A line
//!   is never held: its octets go to the output as they arrive, so a single
//!   line of any length (with no line limit set) costs nothing here, and the
//!   output stops at the message size limit like any other content.
//!
//! Checks: line length (§4.5.3.1.6, not counting a stuffing dot; off with
//! `max_line` 0, the server's default: real senders write longer lines and
//! refusing them loses their mail), message size (RFC 1870), `Received:`
//! count in the header section (loop detection, §6.3). BDAT content gets the
//! same checks (CHUNKING without BINARYMIME still carries text lines), but
//! no dot handling.
//!
//! Not done: MIME or header parsing beyond the `Received:` prefix, adding
//! trace headers.
//!
//! Errors: [`ContentError`], each with its reply.

use crate::reply::{EnhancedCode, Reply};
use crate::server::{BareLfPolicy, NulPolicy};

/// What was wrong with a message's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentError {
    /// A bare CR or LF under `BareLfPolicy::Reject`: 550 5.5.2.
    BareLineEnding,
    /// A line longer than the configured limit (§4.5.3.1.6): 554 5.6.0.
    LineTooLong,
    /// A NUL octet under `NulPolicy::Reject`: 550 5.6.0.
    Nul,
    /// More octets than the size limit: 552 5.3.4 (RFC 1870, RFC 3463).
    TooLarge,
    /// Too many `Received:` fields, a mail loop: 554 5.4.6 (§6.3).
    TooManyHops,
}

impl ContentError {
    /// Every kind, for callers that list them all (metrics start each at 0).
    pub const ALL: [ContentError; 5] = [
        ContentError::BareLineEnding,
        ContentError::LineTooLong,
        ContentError::Nul,
        ContentError::TooLarge,
        ContentError::TooManyHops,
    ];

    /// A stable name for logs and metrics labels.
    pub fn name(&self) -> &'static str {
        match self {
            ContentError::BareLineEnding => "bare_lf",
            ContentError::LineTooLong => "line_too_long",
            ContentError::Nul => "nul",
            ContentError::TooLarge => "too_large",
            ContentError::TooManyHops => "loop",
        }
    }

    /// The reply the session sends after reading the rejected content.
    pub fn reply(&self) -> Reply {
        match self {
            ContentError::BareLineEnding => Reply::new(
                550,
                Some(EnhancedCode(5, 5, 2)),
                "Error: bare <LF> or <CR> in message",
            ),
            // RFC 3463 X.6.0 ("something about the content of a message
            // caused it to be considered undeliverable"): a line length is a
            // property of the content. X.3.4 with 552 says the message is
            // too big for the system, which is the size limit's reply and
            // would have the sender retry a smaller message, not the same
            // one with shorter lines. 554: the transaction failed (§4.2.2),
            // as for every other content refusal here.
            ContentError::LineTooLong => Reply::new(
                554,
                Some(EnhancedCode(5, 6, 0)),
                "Error: message line too long",
            ),
            ContentError::Nul => Reply::new(
                550,
                Some(EnhancedCode(5, 6, 0)),
                "Error: NUL octet in message",
            ),
            ContentError::TooLarge => {
                Reply::new(552, Some(EnhancedCode(5, 3, 4)), "Error: message too large")
            }
            ContentError::TooManyHops => {
                Reply::new(554, Some(EnhancedCode(5, 4, 6)), "Error: too many hops")
            }
        }
    }
}

/// Limits applied to one message.
#[derive(Debug, Clone, Copy)]
pub struct ContentLimits {
    /// Maximum message octets after unstuffing; 0 = unlimited.
    pub max_size: u64,
    /// Maximum line length including CRLF; 0 = unlimited (memory stays
    /// bounded either way: see the module header).
    pub max_line: usize,
    /// Maximum `Received:` fields in the header section.
    pub max_received: usize,
    pub bare_lf: BareLfPolicy,
    pub nul: NulPolicy,
}

/// Incremental decoder for one message's content.
#[derive(Debug, Clone)]
pub struct ContentDecoder {
    limits: ContentLimits,
    /// DATA (dot-stuffed, dot-terminated) or BDAT (counted, raw).
    dot_mode: bool,
    /// At the start of a real (CRLF-delimited) line.
    line_start: bool,
    /// The current line began with a dot that was removed.
    dot_line: bool,
    /// The previous byte was a CR whose meaning depends on the next byte.
    cr_pending: bool,
    /// Raw bytes of the current line so far (incl. a stuffing dot and CR).
    line_len: usize,
    /// Message octets produced so far.
    size: u64,
    error: Option<ContentError>,
    in_headers: bool,
    /// First bytes of the current line's content (header name detection).
    prefix: [u8; 16],
    prefix_len: u8,
    /// Content bytes in the current line (0 = blank line ends headers).
    line_content: usize,
    received: usize,
}

impl ContentDecoder {
    /// A decoder for DATA content (dot-stuffed, ends at CRLF.CRLF).
    pub fn dot(limits: ContentLimits) -> Self {
        Self::new(limits, true)
    }

    /// A decoder for BDAT chunks (counted octets, no dot handling).
    pub fn chunked(limits: ContentLimits) -> Self {
        Self::new(limits, false)
    }

    fn new(limits: ContentLimits, dot_mode: bool) -> Self {
        ContentDecoder {
            limits,
            dot_mode,
            line_start: true,
            dot_line: false,
            cr_pending: false,
            line_len: 0,
            size: 0,
            error: None,
            in_headers: true,
            prefix: [0; 16],
            prefix_len: 0,
            line_content: 0,
            received: 0,
        }
    }

    /// The first problem found so far.
    pub fn error(&self) -> Option<ContentError> {
        self.error
    }

    /// Message octets produced so far (also counted after an error).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Consumes bytes from `input`, appending message content to `out`.
    /// Returns the number of bytes consumed and whether the end of the
    /// content (DATA mode only) was reached; bytes after the terminator are
    /// not consumed.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> (usize, bool) {
        let mut i = 0;
        while i < input.len() {
            if !self.cr_pending && !self.line_start {
                // Mid-line, everything up to the next CR, LF or NUL is
                // ordinary content: take it in one step instead of byte by
                // byte (the per-byte path was the top user-space cost under
                // load).
                let run = memchr::memchr3(b'\r', b'\n', 0, &input[i..]).unwrap_or(input.len() - i);
                if run > 0 {
                    self.plain_run(&input[i..i + run], out);
                    i += run;
                    continue;
                }
            }
            let b = input[i];
            i += 1;
            if self.step(b, out) {
                return (i, true);
            }
        }
        (input.len(), false)
    }

    /// Ordinary bytes in the middle of a line: exactly what `step` does for
    /// each of them, including which limit is reported first when one run
    /// crosses both (per byte, the line length is checked before the size).
    fn plain_run(&mut self, run: &[u8], out: &mut Vec<u8>) {
        let n = run.len();
        // Bytes emitted: all of them, or those before the byte that crosses a limit.
        let mut emit = if self.error.is_none() { n } else { 0 };
        if self.error.is_none() {
            // 1-based index within the run of the byte that crosses each limit.
            let line_cross = (self.limits.max_line != 0).then(|| {
                (self.limits.max_line)
                    .saturating_add(usize::from(self.dot_line) + 1)
                    .saturating_sub(self.line_len)
            });
            let size_cross = (self.limits.max_size != 0).then(|| {
                (self.limits.max_size.saturating_add(1)).saturating_sub(self.size) as usize
            });
            let crossed = match (
                line_cross.filter(|&k| k <= n),
                size_cross.filter(|&k| k <= n),
            ) {
                (Some(l), Some(s)) if s < l => Some((s, ContentError::TooLarge)),
                (Some(l), _) => Some((l, ContentError::LineTooLong)),
                (None, Some(s)) => Some((s, ContentError::TooLarge)),
                (None, None) => None,
            };
            if let Some((k, error)) = crossed {
                self.fail(error);
                emit = k.saturating_sub(1);
            }
        }
        out.extend_from_slice(&run[..emit]);
        self.line_len += n;
        if self.in_headers {
            let have = usize::from(self.prefix_len);
            let take = (self.prefix.len() - have).min(n);
            self.prefix[have..have + take].copy_from_slice(&run[..take]);
            self.prefix_len += take as u8;
        }
        self.line_content += n;
        self.size = self.size.saturating_add(n as u64);
    }

    /// Ends chunked content (BDAT LAST): a CR left at the very end is bare.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if self.cr_pending {
            self.cr_pending = false;
            self.bare(out);
        }
    }

    /// One byte; true when it completed the DATA terminator.
    fn step(&mut self, b: u8, out: &mut Vec<u8>) -> bool {
        if self.cr_pending {
            self.cr_pending = false;
            if b == b'\n' {
                self.count_line_byte();
                // `.` CR LF on a line of its own ends DATA (§4.1.1.4).
                if self.dot_mode && self.dot_line && self.line_len == 3 {
                    return true;
                }
                self.emit(b"\r\n", out);
                self.end_line();
                self.line_start = true;
                return false;
            }
            self.bare(out);
        }
        match b {
            b'\r' => {
                self.cr_pending = true;
                self.line_start = false;
                self.count_line_byte();
            }
            b'\n' => {
                self.count_line_byte();
                self.bare(out);
            }
            0 => {
                self.count_line_byte();
                self.line_start = false;
                match self.limits.nul {
                    NulPolicy::Reject => self.fail(ContentError::Nul),
                    // Counted in the line (the sender sent it) but not
                    // emitted, so not in the size either.
                    NulPolicy::Strip => {}
                }
            }
            _ => {
                self.count_line_byte();
                if self.line_start && self.dot_mode && b == b'.' {
                    // Transparency (§4.5.2): a leading dot is removed.
                    self.line_start = false;
                    self.dot_line = true;
                    return false;
                }
                self.line_start = false;
                self.content_byte(b);
                self.emit(&[b], out);
            }
        }
        false
    }

    fn count_line_byte(&mut self) {
        self.line_len += 1;
        let counted = self.line_len - usize::from(self.dot_line);
        if self.limits.max_line != 0 && counted > self.limits.max_line {
            self.fail(ContentError::LineTooLong);
        }
    }

    /// A bare CR or LF (the caller already counted it as a line byte).
    fn bare(&mut self, out: &mut Vec<u8>) {
        match self.limits.bare_lf {
            BareLfPolicy::Reject => self.fail(ContentError::BareLineEnding),
            BareLfPolicy::Normalize => {
                self.emit(b"\r\n", out);
                self.end_line();
                // A normalized break is a line end for lengths and headers
                // but never a line start for dot handling: only CRLF is.
                self.line_start = false;
            }
        }
    }

    fn end_line(&mut self) {
        if self.in_headers {
            if self.line_content == 0 {
                self.in_headers = false;
            } else if self.is_received() {
                self.received += 1;
                if self.received > self.limits.max_received {
                    self.fail(ContentError::TooManyHops);
                }
            }
        }
        self.line_len = 0;
        self.dot_line = false;
        self.line_content = 0;
        self.prefix_len = 0;
    }

    fn content_byte(&mut self, b: u8) {
        self.line_content += 1;
        if self.in_headers && usize::from(self.prefix_len) < self.prefix.len() {
            self.prefix[usize::from(self.prefix_len)] = b;
            self.prefix_len += 1;
        }
    }

    /// `Received` WSP* `:` at the start of a header line (RFC 5322 §3.6.7,
    /// with the obsolete WSP before the colon of §4.5).
    fn is_received(&self) -> bool {
        let p = &self.prefix[..usize::from(self.prefix_len)];
        let Some(rest) = p
            .get(8..)
            .filter(|_| p[..8].eq_ignore_ascii_case(b"received"))
        else {
            return false;
        };
        let rest: Vec<u8> = rest
            .iter()
            .copied()
            .skip_while(|b| *b == b' ' || *b == b'\t')
            .collect();
        rest.first() == Some(&b':')
    }

    fn emit(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        self.size = self.size.saturating_add(bytes.len() as u64);
        if self.limits.max_size != 0 && self.size > self.limits.max_size {
            self.fail(ContentError::TooLarge);
        }
        if self.error.is_none() {
            out.extend_from_slice(bytes);
        }
    }

    pub(crate) fn fail(&mut self, e: ContentError) {
        if self.error.is_none() {
            self.error = Some(e);
        }
    }
}

#[cfg(test)]
#[path = "data_tests.rs"]
mod tests;
