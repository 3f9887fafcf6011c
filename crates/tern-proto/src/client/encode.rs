//! Outgoing message content: the client-side counterpart of
//! [`crate::data::ContentDecoder`].
//!
//! [`ContentEncoder`] takes the message as the spool stores it (unstuffed,
//! CRLF line ends), in pieces of any size, and produces what goes on the
//! wire: dot-stuffed with the final `.` CRLF for DATA (RFC 5321 §4.5.2), or
//! the same text without stuffing or terminator for BDAT chunks (RFC 3030).
//!
//! Invariants (checked by property tests in `encode_tests.rs`):
//! - No bare CR or LF leaves: each bare CR, bare LF is sent as CRLF (so the
//!   next server cannot read `<LF>.<LF>` or similar as an end of data, and
//!   nobody smuggles a message through us). A NUL octet is dropped: it is
//!   not text (RFC 5322, RFC 6152), and a server that strips NULs would read
//!   `<CRLF>NUL.<CRLF>` as the end of data.
//! - Unless folding is off (below), no line is longer than 998 octets
//!   before its CRLF (RFC 5321 §4.5.3.1.6, RFC 5322 §2.1.1), not counting
//!   a stuffing dot. A longer
//!   line is folded, never cut:
//!   - in the header section, CRLF is inserted before the last space or tab
//!     that leaves some text on the line (RFC 5322 §2.2.3 folding: unfolding
//!     gives the field back exactly);
//!   - in the body, and in a header line with no such whitespace, CRLF SP is
//!     inserted after 998 octets, as Postfix's `smtp_line_length_limit`
//!     does: in a header the rest stays part of the same field, in a MIME
//!     part's header too, and in `format=flowed` text (RFC 3676 §4.4) the
//!     space reads as stuffing. Exim instead refuses such lines on receipt
//!     (`message_linelength_limit`) and Debian's configuration bounces them
//!     rather than send them: the message is lost, which is worse than a
//!     visible break. **This hard break changes the message content**: the
//!     receiver sees two lines where there was one. It only happens to lines
//!     beyond the RFC 5321 limit, which no server has to accept and which
//!     many would cut or refuse instead.
//!
//!   [`ContentEncoder::keep_long_lines`] turns folding off, for LMTP into a
//!   mailbox store: the message arrives as it was received (a store has no
//!   1000-octet limit to meet, and nobody relays after it).
//! - In DATA mode every line starting with `.` gets one more `.` (the rest
//!   of a folded line starts with white space and never needs it), and
//!   `.` CRLF appears only at the end.
//! - Content that does not end with CRLF gets one, so the terminator is
//!   always on a line of its own.
//! - Memory is bounded: at most one line (998 octets) is held back, also
//!   without folding (a longer line is then written in pieces).
//!
//! Input with CRLF line ends only, no NUL and no line over 998 octets comes
//! out unchanged apart from stuffing: decoding it with `ContentDecoder`
//! gives the input back.
//!
//! Not done: MIME conversion (8BITMIME to 7-bit, RFC 6152 §3): a message the
//! server cannot take is refused by the client before it is sent.
//!
//! Errors: none; every input is encodable.

/// Longest line of text before its CRLF (RFC 5321 §4.5.3.1.6: 1000 with CRLF).
pub const MAX_TEXT_LINE: usize = 998;

/// Incremental encoder for one message's content. See the module header.
#[derive(Debug, Clone)]
pub struct ContentEncoder {
    /// DATA (stuffed, terminated) rather than BDAT.
    dot: bool,
    /// Break lines longer than `MAX_TEXT_LINE` (see `keep_long_lines`).
    fold: bool,
    /// The current line's octets not yet written; at most `MAX_TEXT_LINE`.
    line: Vec<u8>,
    /// Without folding: the start of the current line was already written,
    /// so the rest is neither stuffed nor the blank line ending the header.
    continued: bool,
    /// The previous input octet was a CR whose meaning the next one decides.
    cr_pending: bool,
    /// Still in the header section (before the first empty line).
    in_headers: bool,
    finished: bool,
}

impl ContentEncoder {
    /// Encoder for DATA: dot-stuffing and the final `.` CRLF.
    pub fn dot() -> ContentEncoder {
        ContentEncoder::new(true)
    }

    /// Encoder for BDAT chunks: no stuffing, no terminator.
    pub fn chunked() -> ContentEncoder {
        ContentEncoder::new(false)
    }

    fn new(dot: bool) -> ContentEncoder {
        ContentEncoder {
            dot,
            fold: true,
            line: Vec::with_capacity(128),
            continued: false,
            cr_pending: false,
            in_headers: true,
            finished: false,
        }
    }

    /// Sends lines longer than 998 octets as they are instead of folding
    /// them (for LMTP delivery into a store, see the module header).
    pub fn keep_long_lines(mut self) -> ContentEncoder {
        self.fold = false;
        self
    }

    /// Encodes the next piece of the message, appending to `out`. Octets of
    /// an unfinished line are held back until its end (or `finish`).
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) {
        if self.finished {
            return;
        }
        let mut i = 0;
        while i < input.len() {
            // The common case, a whole well-formed line at the start of a
            // line: written straight from the input (held back in `line`,
            // every line was copied twice).
            if !self.cr_pending && self.line.is_empty() && !self.continued {
                let rest = &input[i..];
                if let Some(run) = memchr::memchr3(b'\r', b'\n', 0, rest)
                    && (run <= MAX_TEXT_LINE || !self.fold)
                    && rest[run] == b'\r'
                    && rest.get(run + 1) == Some(&b'\n')
                {
                    if self.in_headers && run == 0 {
                        self.in_headers = false;
                    }
                    emit_line(self.dot, &rest[..run], out);
                    i += run + 2;
                    continue;
                }
            }
            if self.cr_pending {
                self.cr_pending = false;
                self.end_line(out);
                if input[i] == b'\n' {
                    i += 1;
                    continue;
                }
            }
            match input[i] {
                b'\r' => {
                    self.cr_pending = true;
                    i += 1;
                }
                b'\n' => {
                    self.end_line(out);
                    i += 1;
                }
                0 => i += 1,
                _ => {
                    let run =
                        memchr::memchr3(b'\r', b'\n', 0, &input[i..]).unwrap_or(input.len() - i);
                    self.push_text(&input[i..i + run], out);
                    i += run;
                }
            }
        }
    }

    /// Ends the content: a pending line gets its CRLF, and in DATA mode the
    /// terminator follows. Later calls do nothing.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if self.finished {
            return;
        }
        if self.cr_pending || !self.line.is_empty() || self.continued {
            self.cr_pending = false;
            self.end_line(out);
        }
        if self.dot {
            out.extend_from_slice(b".\r\n");
        }
        self.finished = true;
    }

    /// Text octets (no CR, LF or NUL) of the current line.
    fn push_text(&mut self, mut run: &[u8], out: &mut Vec<u8>) {
        while !run.is_empty() {
            let room = MAX_TEXT_LINE - self.line.len();
            if run.len() <= room {
                self.line.extend_from_slice(run);
                return;
            }
            self.line.extend_from_slice(&run[..room]);
            run = &run[room..];
            // The line is full and more text follows on it.
            self.fold(out);
        }
    }

    /// Breaks the full current line; what stays in `line` is shorter.
    fn fold(&mut self, out: &mut Vec<u8>) {
        if !self.fold {
            // Written without its CRLF: the line goes on.
            if !self.continued && self.dot && self.line.first() == Some(&b'.') {
                out.push(b'.');
            }
            out.extend_from_slice(&self.line);
            self.line.clear();
            self.continued = true;
            return;
        }
        if self.in_headers
            && let Some(at) = fold_point(&self.line)
        {
            emit_line(self.dot, &self.line[..at], out);
            // The continuation starts with the whitespace itself.
            self.line.drain(..at);
            return;
        }
        emit_line(self.dot, &self.line, out);
        self.line.clear();
        // A header continuation line must start with whitespace, or the
        // rest would read as a new field; the body gets the same (see the
        // module header).
        self.line.push(b' ');
    }

    fn end_line(&mut self, out: &mut Vec<u8>) {
        if self.continued {
            out.extend_from_slice(&self.line);
            out.extend_from_slice(b"\r\n");
            self.line.clear();
            self.continued = false;
            return;
        }
        if self.in_headers && self.line.is_empty() {
            self.in_headers = false;
        }
        emit_line(self.dot, &self.line, out);
        self.line.clear();
    }
}

/// The last space or tab in `line` with some other octet before it.
fn fold_point(line: &[u8]) -> Option<usize> {
    let first_text = line.iter().position(|&b| b != b' ' && b != b'\t')?;
    let at = line.iter().rposition(|&b| b == b' ' || b == b'\t')?;
    (at > first_text).then_some(at)
}

fn emit_line(dot: bool, line: &[u8], out: &mut Vec<u8>) {
    if dot && line.first() == Some(&b'.') {
        out.push(b'.');
    }
    out.extend_from_slice(line);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
#[path = "encode_tests.rs"]
mod tests;
