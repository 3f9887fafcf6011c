//! Reading server replies out of the byte stream, a line at a time.
//!
//! Invariants: memory is bounded: the partial line is at most
//! [`MAX_REPLY_LINE`] octets and a reply in progress at most
//! [`MAX_REPLY_LINES`] lines and [`MAX_REPLY_BYTES`] octets; each octet is
//! looked at a bounded number of times however the input is split (a
//! server dribbling one octet per packet costs no re-parsing); input that
//! cannot be the start of a reply is refused at once, without waiting for
//! its end of line.
//!
//! Not done: recovering after an error (the client gives up on the
//! connection; a reader that failed must not be fed again).
//!
//! Errors: a `&'static str` saying what was wrong, for
//! `LocalFailure::MalformedReply`.

use crate::reply::{MAX_REPLY_LINE, Reply};

/// Lines in one reply; more is a hostile or broken server.
pub const MAX_REPLY_LINES: usize = 100;
/// Octets in one reply.
pub const MAX_REPLY_BYTES: usize = 64 * 1024;

#[derive(Debug, Default)]
pub(super) struct ReplyReader {
    /// The line in progress, without its LF.
    partial: Vec<u8>,
    /// Complete lines of the reply in progress, with their line ends.
    reply: Vec<u8>,
    lines: usize,
    code: Option<[u8; 3]>,
}

/// What one call to `ReplyReader::read` found.
pub(super) enum Read {
    /// All input consumed, no complete reply yet.
    NeedMore,
    /// A reply, and how many input octets it used.
    Reply(Reply, usize),
    Error(&'static str),
}

impl ReplyReader {
    /// True when no partial reply is held.
    pub fn is_empty(&self) -> bool {
        self.partial.is_empty() && self.reply.is_empty()
    }

    /// Reads from `input` up to the end of the next complete reply.
    pub fn read(&mut self, input: &[u8]) -> Read {
        let mut pos = 0;
        while pos < input.len() {
            let rest = &input[pos..];
            let Some(nl) = memchr::memchr(b'\n', rest) else {
                self.partial.extend_from_slice(rest);
                if self.partial.len() > MAX_REPLY_LINE {
                    return Read::Error("reply line too long");
                }
                if let Err(e) = check_start(&self.partial) {
                    return Read::Error(e);
                }
                return Read::NeedMore;
            };
            self.partial.extend_from_slice(&rest[..nl]);
            pos += nl + 1;
            if self.partial.len() > MAX_REPLY_LINE {
                return Read::Error("reply line too long");
            }
            let last = match self.check_line() {
                Ok(last) => last,
                Err(e) => return Read::Error(e),
            };
            let line = self.partial.strip_suffix(b"\r").unwrap_or(&self.partial);
            self.reply.extend_from_slice(line);
            self.reply.extend_from_slice(b"\r\n");
            self.partial.clear();
            self.lines += 1;
            if self.lines > MAX_REPLY_LINES {
                return Read::Error("too many reply lines");
            }
            if self.reply.len() > MAX_REPLY_BYTES {
                return Read::Error("reply too long");
            }
            if last {
                let parsed = Reply::parse(&self.reply);
                self.reply.clear();
                self.lines = 0;
                self.code = None;
                return match parsed {
                    Ok((reply, _)) => Read::Reply(reply, pos),
                    Err(_) => Read::Error("not an SMTP reply"),
                };
            }
        }
        Read::NeedMore
    }

    /// Checks the complete line in `partial`; true when it is the last of
    /// its reply.
    fn check_line(&mut self) -> Result<bool, &'static str> {
        let line = self.partial.strip_suffix(b"\r").unwrap_or(&self.partial);
        check_start(line)?;
        if line.len() < 3 {
            return Err("not an SMTP reply");
        }
        let code = [line[0], line[1], line[2]];
        match self.code {
            None => self.code = Some(code),
            Some(c) if c != code => return Err("reply lines carry different codes"),
            Some(_) => {}
        }
        Ok(line.get(3) != Some(&b'-'))
    }
}

/// Whether `s` can be the start of a reply line: three digits making a code
/// of 200..=599, then SP, `-` or the end of the line.
fn check_start(s: &[u8]) -> Result<(), &'static str> {
    const BAD: &str = "not an SMTP reply";
    for (i, &b) in s.iter().take(3).enumerate() {
        let ok = if i == 0 {
            (b'2'..=b'5').contains(&b)
        } else {
            b.is_ascii_digit()
        };
        if !ok {
            return Err(BAD);
        }
    }
    match s.get(3) {
        None | Some(b' ' | b'-' | b'\r') => Ok(()),
        Some(_) => Err(BAD),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(input: &[u8], step: usize) -> Vec<Result<Reply, &'static str>> {
        let mut r = ReplyReader::default();
        let mut out = Vec::new();
        for piece in input.chunks(step) {
            let mut piece = piece;
            loop {
                match r.read(piece) {
                    Read::NeedMore => break,
                    Read::Reply(reply, n) => {
                        out.push(Ok(reply));
                        piece = &piece[n..];
                    }
                    Read::Error(e) => {
                        out.push(Err(e));
                        return out;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn splits_replies_at_any_point() {
        let input = b"220 hi\r\n250-a\r\n250 b\r\n354 go\n";
        for step in [1, 2, 5, 100] {
            let got = read_all(input, step);
            assert_eq!(got.len(), 3);
            let r = got[1].as_ref().unwrap();
            assert_eq!(
                (r.code, r.lines.clone()),
                (250, vec!["a".into(), "b".into()])
            );
        }
    }

    #[test]
    fn refuses_garbage_early_and_bounds_everything() {
        assert_eq!(read_all(b"HTTP/1.1", 1), vec![Err("not an SMTP reply")]);
        assert_eq!(read_all(b"199 x\r\n", 100), vec![Err("not an SMTP reply")]);
        assert_eq!(read_all(b"250x", 100), vec![Err("not an SMTP reply")]);
        let mut long = b"250 ".to_vec();
        long.extend(std::iter::repeat_n(b'x', MAX_REPLY_LINE));
        assert_eq!(read_all(&long, 7), vec![Err("reply line too long")]);
        long.extend_from_slice(b"\r\n");
        assert_eq!(read_all(&long, 10_000), vec![Err("reply line too long")]);
        let many = b"250-x\r\n".repeat(MAX_REPLY_LINES + 1);
        assert_eq!(read_all(&many, 1000), vec![Err("too many reply lines")]);
        assert_eq!(
            read_all(b"250-a\r\n251 b\r\n", 3),
            vec![Err("reply lines carry different codes")]
        );
        let mut big = Vec::new();
        for _ in 0..20 {
            big.extend_from_slice(b"250-");
            big.extend(std::iter::repeat_n(b'x', 4000));
            big.extend_from_slice(b"\r\n");
        }
        assert_eq!(read_all(&big, 4096), vec![Err("reply too long")]);
    }
}
