//! Header-section filtering of message content as it streams in.
//!
//! [`ForgedResultsFilter`] removes every `Authentication-Results:` field
//! whose authserv-id is our own (RFC 8601 §5): mail readers trust results
//! under our name, so a sender must not be able to write them. It runs
//! before anything else reads the header section, so even results Tern adds
//! later cannot be confused with forged ones.
//!
//! Invariants: the output is the input minus the removed fields' octets
//! (every line of such a field, continuation lines included), however the
//! input is split; nothing past the header section is looked at or copied;
//! memory is bounded by [`MAX_HELD_FIELD`] plus a field name.
//!
//! Not done: other trust-sensitive fields (ARC sets are checked by whoever
//! verifies them).
//!
//! Errors: none; malformed fields pass through unchanged, except that an
//! `Authentication-Results:` field too long to read its authserv-id from is
//! removed.

/// Longest `Authentication-Results:` field kept in memory while it is read;
/// one longer is removed (real ones are a few hundred octets).
pub const MAX_HELD_FIELD: usize = 64 * 1024;

/// Octets of a field line read before deciding that its name is not the
/// one we look for.
const NAME_PEEK: usize = 64;

const FIELD_NAME: &[u8] = b"Authentication-Results";

/// What happens to the octets of the current header field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Pass,
    /// An `Authentication-Results:` field, held until it ends.
    Hold,
    /// Removed (held field that grew past the limit).
    Drop,
}

/// Where in the current header line the filter is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    /// At the first octet of a line.
    Start,
    /// After a CR at the start of a line: a blank line if LF follows.
    StartCr,
    /// Reading a field name into `name`.
    Name,
    /// In the rest of the line, up to its LF.
    Rest,
}

/// Removes forged `Authentication-Results:` fields; see the module header.
#[derive(Debug, Clone)]
pub struct ForgedResultsFilter {
    authserv_id: String,
    in_body: bool,
    field: Field,
    line: Line,
    /// The start of a field line while its name is read.
    name: Vec<u8>,
    /// The `Authentication-Results:` field being read.
    held: Vec<u8>,
}

impl ForgedResultsFilter {
    /// A filter for one message; `authserv_id` is our host name.
    pub fn new(authserv_id: &str) -> Self {
        ForgedResultsFilter {
            authserv_id: authserv_id.trim_end_matches('.').to_string(),
            in_body: false,
            field: Field::Pass,
            line: Line::Start,
            name: Vec::new(),
            held: Vec::new(),
        }
    }

    /// Filters the next piece of content (CRLF line ends, unstuffed). The
    /// result is `input` itself once the header section is over, otherwise
    /// what `scratch` was filled with.
    pub fn feed<'a>(&mut self, input: &'a [u8], scratch: &'a mut Vec<u8>) -> &'a [u8] {
        if self.in_body {
            return input;
        }
        scratch.clear();
        let mut i = 0;
        while i < input.len() {
            if self.in_body {
                scratch.extend_from_slice(&input[i..]);
                break;
            }
            if self.line == Line::Rest {
                let end = memchr::memchr(b'\n', &input[i..]).map_or(input.len(), |n| i + n + 1);
                self.put(&input[i..end], scratch);
                if input[end - 1] == b'\n' {
                    self.line = Line::Start;
                }
                i = end;
                continue;
            }
            self.byte(input[i], scratch);
            i += 1;
        }
        scratch
    }

    /// The content ended: whatever is still held is decided and written.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if self.in_body {
            return;
        }
        if self.line == Line::Name {
            self.decide_name(out);
        }
        if self.line == Line::StartCr {
            self.put(b"\r", out);
        }
        self.end_field(out);
        self.line = Line::Start;
    }

    fn byte(&mut self, b: u8, out: &mut Vec<u8>) {
        match self.line {
            Line::Start => match b {
                // A continuation line belongs to the current field.
                b' ' | b'\t' => {
                    self.line = Line::Rest;
                    self.put(&[b], out);
                }
                b'\r' => self.line = Line::StartCr,
                b'\n' => self.end_headers(b"\n", out),
                _ => {
                    self.end_field(out);
                    self.name.clear();
                    self.name.push(b);
                    self.line = Line::Name;
                }
            },
            Line::StartCr => {
                if b == b'\n' {
                    self.end_headers(b"\r\n", out);
                } else {
                    // A bare CR opening a line: not a field we look for.
                    self.end_field(out);
                    out.push(b'\r');
                    self.line = Line::Rest;
                    self.byte(b, out);
                }
            }
            Line::Name => {
                self.name.push(b);
                if b == b':' || b == b'\n' || self.name.len() >= NAME_PEEK {
                    self.decide_name(out);
                    if b == b'\n' {
                        self.line = Line::Start;
                    }
                }
            }
            Line::Rest => {
                self.put(&[b], out);
                if b == b'\n' {
                    self.line = Line::Start;
                }
            }
        }
    }

    /// The name of a new field has been read (or enough of it).
    fn decide_name(&mut self, out: &mut Vec<u8>) {
        let name = std::mem::take(&mut self.name);
        let is_results = name.last() == Some(&b':') && {
            // RFC 5322 §4.5 (obsolete syntax): WSP before the colon.
            let n = &name[..name.len() - 1];
            let n = &n[..n.len()
                - n.iter()
                    .rev()
                    .take_while(|b| **b == b' ' || **b == b'\t')
                    .count()];
            n.eq_ignore_ascii_case(FIELD_NAME)
        };
        self.field = if is_results { Field::Hold } else { Field::Pass };
        self.line = Line::Rest;
        self.put(&name, out);
        self.name = name;
        self.name.clear();
    }

    fn put(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        match self.field {
            Field::Pass => out.extend_from_slice(bytes),
            Field::Hold => {
                if self.held.len() + bytes.len() > MAX_HELD_FIELD {
                    self.held = Vec::new();
                    self.field = Field::Drop;
                } else {
                    self.held.extend_from_slice(bytes);
                }
            }
            Field::Drop => {}
        }
    }

    /// The current field is complete: a held one is written unless it
    /// claims our authserv-id.
    fn end_field(&mut self, out: &mut Vec<u8>) {
        if self.field == Field::Hold && !claims_id(&self.held, &self.authserv_id) {
            out.extend_from_slice(&self.held);
        }
        self.held = Vec::new();
        self.field = Field::Pass;
    }

    fn end_headers(&mut self, blank: &[u8], out: &mut Vec<u8>) {
        self.end_field(out);
        out.extend_from_slice(blank);
        self.in_body = true;
        self.line = Line::Start;
    }
}

/// True when an `Authentication-Results:` field (name included) names
/// `id` as its authserv-id: the first value after the colon, past any
/// comments and folding (RFC 8601 §2.2), compared without case.
fn claims_id(field: &[u8], id: &str) -> bool {
    let Some(colon) = field.iter().position(|&b| b == b':') else {
        return false;
    };
    let v = &field[colon + 1..];
    let mut i = skip_cfws(v, 0);
    let found: Vec<u8> = if v.get(i) == Some(&b'"') {
        // quoted-string: the id is its content, quoted-pairs resolved.
        let mut s = Vec::new();
        i += 1;
        while let Some(&b) = v.get(i) {
            match b {
                b'"' => break,
                b'\\' => {
                    if let Some(&q) = v.get(i + 1) {
                        s.push(q);
                    }
                    i += 2;
                }
                b'\r' | b'\n' => i += 1,
                _ => {
                    s.push(b);
                    i += 1;
                }
            }
        }
        s
    } else {
        let end = v[i..]
            .iter()
            .position(|b| matches!(b, b';' | b' ' | b'\t' | b'\r' | b'\n' | b'('))
            .map_or(v.len(), |n| i + n);
        v[i..end].to_vec()
    };
    let found = found.strip_suffix(b".").unwrap_or(&found);
    !found.is_empty() && found.eq_ignore_ascii_case(id.as_bytes())
}

/// Skips whitespace, folding and (nested) comments from `i`.
fn skip_cfws(v: &[u8], mut i: usize) -> usize {
    loop {
        match v.get(i) {
            Some(b' ' | b'\t' | b'\r' | b'\n') => i += 1,
            Some(b'(') => {
                let mut depth = 0usize;
                while let Some(&b) = v.get(i) {
                    i += 1;
                    match b {
                        b'(' => depth += 1,
                        b')' => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        b'\\' => i += 1,
                        _ => {}
                    }
                }
            }
            _ => return i,
        }
    }
}

#[cfg(test)]
#[path = "headers_tests.rs"]
mod tests;
