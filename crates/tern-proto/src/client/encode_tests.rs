//! Tests for `ContentEncoder`: stuffing, line ends, folding, and the
//! round trip through the server's `ContentDecoder`.

use super::*;
use crate::data::{ContentDecoder, ContentLimits};
use crate::server::{BareLfPolicy, NulPolicy};
use proptest::prelude::*;

/// Encodes `input` in pieces of `step` octets.
fn encode(dot: bool, input: &[u8], step: usize) -> Vec<u8> {
    let mut e = if dot {
        ContentEncoder::dot()
    } else {
        ContentEncoder::chunked()
    };
    let mut out = Vec::new();
    for piece in input.chunks(step.max(1)) {
        e.feed(piece, &mut out);
    }
    e.finish(&mut out);
    e.finish(&mut out);
    out
}

/// The server's strict decoder: returns (content, consumed, done).
fn decode(wire: &[u8]) -> (Vec<u8>, usize, bool, Option<crate::data::ContentError>) {
    let mut d = ContentDecoder::dot(ContentLimits {
        max_size: 0,
        max_line: 1000,
        max_received: usize::MAX,
        bare_lf: BareLfPolicy::Reject,
        nul: NulPolicy::Reject,
    });
    let mut out = Vec::new();
    let (n, done) = d.feed(wire, &mut out);
    (out, n, done, d.error())
}

/// Output lines (split on CRLF), without their CRLF; asserts every CR and
/// LF belongs to a CRLF pair.
fn lines(wire: &[u8]) -> Vec<&[u8]> {
    for (i, &b) in wire.iter().enumerate() {
        if b == b'\r' {
            assert_eq!(wire.get(i + 1), Some(&b'\n'), "bare CR at {i}");
        }
        if b == b'\n' {
            assert!(i > 0 && wire[i - 1] == b'\r', "bare LF at {i}");
        }
    }
    let mut v: Vec<&[u8]> = wire.split(|&b| b == b'\n').collect();
    assert_eq!(v.pop(), Some(&b""[..]), "output must end with CRLF");
    v.into_iter()
        .map(|l| l.strip_suffix(b"\r").unwrap())
        .collect()
}

#[test]
fn stuffs_and_terminates() {
    let out = encode(true, b"a\r\n.b\r\n..\r\n.\r\n", 1000);
    assert_eq!(out, b"a\r\n..b\r\n...\r\n..\r\n.\r\n");
    assert_eq!(encode(true, b"", 1), b".\r\n");
    // BDAT: no stuffing, no terminator.
    assert_eq!(encode(false, b".\r\n", 1), b".\r\n");
}

#[test]
fn adds_missing_final_crlf() {
    assert_eq!(encode(true, b"x", 1), b"x\r\n.\r\n");
    assert_eq!(encode(false, b"x", 1), b"x\r\n");
    assert_eq!(encode(true, b"x\r", 1), b"x\r\n.\r\n");
}

#[test]
fn bare_line_ends_become_crlf() {
    for step in [1, 2, 100] {
        assert_eq!(
            encode(true, b"a\nb\rc\r\r\nd\n.\n", step),
            b"a\r\nb\r\nc\r\n\r\nd\r\n..\r\n.\r\n"
        );
    }
}

#[test]
fn nul_is_dropped() {
    // `<CRLF>NUL.<CRLF>` must not become a line a NUL-stripping server ends DATA on.
    assert_eq!(encode(true, b"a\r\n\0.\r\n", 1), b"a\r\n..\r\n.\r\n");
}

#[test]
fn long_header_folds_at_whitespace() {
    let mut input = b"Subject: ".to_vec();
    for _ in 0..300 {
        input.extend_from_slice(b"word ");
    }
    input.extend_from_slice(b"\r\n\r\nbody\r\n");
    let out = encode(true, &input, 7);
    let ls = lines(&out);
    assert!(ls.iter().all(|l| l.len() <= MAX_TEXT_LINE));
    assert!(
        ls[1].starts_with(b" "),
        "continuation starts with the space"
    );
    // Unfolding (removing CRLF before WSP) gives the field back exactly.
    let (content, _, done, err) = decode(&out);
    assert!(done && err.is_none());
    let unfolded = String::from_utf8(content).unwrap().replace("\r\n ", " ");
    assert_eq!(unfolded.as_bytes(), &input[..]);
}

#[test]
fn long_header_without_whitespace_gets_a_continuation_space() {
    let mut input = b"X-Token: ".to_vec();
    input.extend(std::iter::repeat_n(b'a', 2000));
    input.extend_from_slice(b"\r\n\r\n");
    let out = encode(false, &input, 1000);
    let ls = lines(&out);
    // Folded after the name, then hard breaks: every continuation starts
    // with whitespace, so the token stays in the same field.
    assert_eq!(ls[0], b"X-Token:");
    assert!(ls.len() == 5 && ls[4].is_empty());
    for l in &ls[1..4] {
        assert!(l[0] == b' ' && l.len() <= MAX_TEXT_LINE);
    }
    assert_eq!(ls[1].len(), MAX_TEXT_LINE);
    let joined: Vec<u8> = ls[1..4].concat();
    assert_eq!(joined.iter().filter(|&&b| b == b'a').count(), 2000);
}

#[test]
fn long_body_line_breaks_at_998_with_a_space_as_postfix_does() {
    let mut input = b"H: v\r\n\r\n".to_vec();
    input.extend(std::iter::repeat_n(b'x', MAX_TEXT_LINE));
    input.extend_from_slice(b".tail\r\n");
    let out = encode(true, &input, 333);
    let ls = lines(&out);
    assert_eq!(ls[2].len(), MAX_TEXT_LINE);
    // The rest follows CRLF SP, so it never starts with a dot to stuff.
    assert_eq!(ls[3], b" .tail");
    let (content, n, done, err) = decode(&out);
    assert!(done && err.is_none() && n == out.len());
    let mut expected = input[..8 + MAX_TEXT_LINE].to_vec();
    expected.extend_from_slice(b"\r\n .tail\r\n");
    assert_eq!(content, expected);
}

/// Encodes with folding off, in pieces of `step` octets.
fn encode_whole(dot: bool, input: &[u8], step: usize) -> Vec<u8> {
    let e = if dot {
        ContentEncoder::dot()
    } else {
        ContentEncoder::chunked()
    };
    let mut e = e.keep_long_lines();
    let mut out = Vec::new();
    for piece in input.chunks(step.max(1)) {
        e.feed(piece, &mut out);
    }
    e.finish(&mut out);
    out
}

/// The server's decoder without a line limit.
fn decode_unlimited(wire: &[u8]) -> (Vec<u8>, usize, bool, Option<crate::data::ContentError>) {
    let mut d = ContentDecoder::dot(ContentLimits {
        max_size: 0,
        max_line: 0,
        max_received: usize::MAX,
        bare_lf: BareLfPolicy::Reject,
        nul: NulPolicy::Reject,
    });
    let mut out = Vec::new();
    let (n, done) = d.feed(wire, &mut out);
    (out, n, done, d.error())
}

#[test]
fn keep_long_lines_sends_them_whole_and_stuffed() {
    let mut input = b"To: ".to_vec();
    input.extend(std::iter::repeat_n(b'a', 3000));
    input.extend_from_slice(b"\r\n\r\n.");
    input.extend(std::iter::repeat_n(b'b', 5000));
    input.extend_from_slice(b"\r\nend");
    for step in [1, 100, 999, 10_000] {
        let out = encode_whole(true, &input, step);
        let ls = lines(&out);
        assert_eq!(ls.len(), 5, "step {step}");
        assert_eq!(ls[0].len(), 3004);
        assert!(ls[1].is_empty());
        assert_eq!(&ls[2][..2], b"..", "stuffed once, at the line's start");
        assert_eq!(ls[2].len(), 5002);
        assert_eq!((ls[3], ls[4]), (&b"end"[..], &b"."[..]));
        let (content, n, done, err) = decode_unlimited(&out);
        assert!(done && err.is_none() && n == out.len());
        assert_eq!(content, [&input[..], b"\r\n"].concat());
        let chunked = encode_whole(false, &input, step);
        assert_eq!(chunked, [&input[..], b"\r\n"].concat());
    }
}

#[test]
fn exactly_998_is_not_folded() {
    let mut input = b"\r\n".to_vec();
    input.extend(std::iter::repeat_n(b'y', MAX_TEXT_LINE));
    input.extend_from_slice(b"\r\n");
    let out = encode(true, &input, 10);
    let (content, _, done, err) = decode(&out);
    assert!(done && err.is_none());
    assert_eq!(content, input);
}

fn arb_text_line() -> impl Strategy<Value = Vec<u8>> {
    // Mostly short lines with dots and spaces; sometimes long ones.
    prop_oneof![
        4 => prop::collection::vec(prop_oneof![Just(b'.'), Just(b' '), Just(b'a'), 1u8..=255], 0..40),
        1 => prop::collection::vec(prop_oneof![Just(b'.'), Just(b' '), Just(b'b')], 900..1100),
    ]
    .prop_map(|l| {
        l.into_iter()
            .filter(|b| *b != b'\r' && *b != b'\n' && *b != 0)
            .collect()
    })
}

fn join_crlf(ls: &[Vec<u8>]) -> Vec<u8> {
    let mut v = Vec::new();
    for l in ls {
        v.extend_from_slice(l);
        v.extend_from_slice(b"\r\n");
    }
    v
}

/// RFC 5322 §2.2.3 unfolding: every CRLF followed by a space or tab goes.
fn unfold(v: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    while i < v.len() {
        if v[i..].starts_with(b"\r\n") && matches!(v.get(i + 2), Some(b' ' | b'\t')) {
            i += 2;
            continue;
        }
        out.push(v[i]);
        i += 1;
    }
    out
}

/// A header field with words of 1..`max_word` octets between single spaces
/// or tabs, fewer than `max_words` of them.
fn arb_field(max_word: usize, max_words: usize) -> impl Strategy<Value = Vec<u8>> {
    (
        prop::collection::vec(
            (
                prop::collection::vec(
                    prop_oneof![Just(b'a'), Just(b'.'), Just(b','), 33u8..=126],
                    1..max_word,
                ),
                prop_oneof![Just(b' '), Just(b'\t')],
            ),
            1..max_words,
        ),
        "[A-Za-z-]{1,20}",
    )
        .prop_map(|(words, name)| {
            let mut f = name.into_bytes();
            f.extend_from_slice(b": ");
            for (w, sep) in words {
                f.extend_from_slice(&w);
                f.push(sep);
            }
            f.extend_from_slice(b"end");
            f
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Folding a long header field at its whitespace: no line over 998
    /// octets, and unfolding gives the field back exactly.
    #[test]
    fn folded_headers_unfold_to_the_original(
        field in arb_field(60, 400),
        step in 1usize..2000,
        dot in any::<bool>(),
    ) {
        let mut input = field.clone();
        input.extend_from_slice(b"\r\nSubject: x\r\n\r\nbody\r\n");
        let out = encode(dot, &input, step);
        for l in lines(&out) {
            let stuffed = usize::from(dot && l.starts_with(b".."));
            prop_assert!(l.len() - stuffed <= MAX_TEXT_LINE);
        }
        let sent = if dot { decode(&out).0 } else { out };
        prop_assert_eq!(unfold(&sent), unfold(&input));
        // Only the long field was touched.
        prop_assert!(sent.ends_with(b"\r\nSubject: x\r\n\r\nbody\r\n"));
    }

    /// A field with words too long to fold at whitespace still ends up in
    /// lines of at most 998 octets, each continuation starting with
    /// whitespace (still the same field), with no octet lost.
    #[test]
    fn unfoldable_headers_are_broken_within_the_field(
        field in arb_field(3000, 12),
        step in prop_oneof![1usize..10, 500usize..5000],
    ) {
        let mut input = field.clone();
        input.extend_from_slice(b"\r\n\r\n");
        let out = encode(false, &input, step);
        let ls = lines(&out);
        prop_assert!(ls.iter().all(|l| l.len() <= MAX_TEXT_LINE));
        let blank = ls.iter().position(|l| l.is_empty());
        prop_assert_eq!(blank, Some(ls.len() - 1), "one field, then the blank line");
        prop_assert!(ls[1..ls.len() - 1].iter().all(|l| matches!(l[0], b' ' | b'\t')));
        let strip = |v: &[u8]| -> Vec<u8> { v.iter().copied().filter(|b| !matches!(b, b' ' | b'\t' | b'\r' | b'\n')).collect() };
        prop_assert_eq!(strip(&out), strip(&input));
    }

    /// Without folding, any clean content comes out as it went in.
    #[test]
    fn keep_long_lines_round_trips(
        ls in prop::collection::vec(arb_text_line(), 0..20),
        step in 1usize..3000,
    ) {
        let input = join_crlf(&ls);
        let out = encode_whole(true, &input, step);
        let (content, n, done, err) = decode_unlimited(&out);
        prop_assert!(done);
        prop_assert_eq!(err, None);
        prop_assert_eq!(n, out.len());
        prop_assert_eq!(content, input.clone());
        prop_assert_eq!(encode_whole(false, &input, step), input);
    }

}

proptest! {
    #[test]
    fn round_trips_through_the_server_decoder(
        ls in prop::collection::vec(arb_text_line(), 0..20),
        step in 1usize..200,
    ) {
        let ls: Vec<Vec<u8>> = ls.into_iter().map(|mut l| { l.truncate(MAX_TEXT_LINE); l }).collect();
        let input = join_crlf(&ls);
        let out = encode(true, &input, step);
        let (content, n, done, err) = decode(&out);
        prop_assert!(done);
        prop_assert_eq!(err, None);
        prop_assert_eq!(n, out.len(), "terminator only at the end");
        prop_assert_eq!(content, input.clone());
        // BDAT carries the same text without stuffing.
        let chunked = encode(false, &input, step);
        prop_assert_eq!(chunked, input);
    }

    #[test]
    fn any_input_gives_well_formed_output(
        input in prop::collection::vec(
            prop_oneof![Just(b'\r'), Just(b'\n'), Just(b'.'), Just(b' '), Just(0u8), any::<u8>()],
            0..3000),
        step in 1usize..300,
        dot in any::<bool>(),
    ) {
        let out = encode(dot, &input, step);
        if !out.is_empty() {
            for l in lines(&out) {
                let stuffed = usize::from(dot && l.starts_with(b".."));
                prop_assert!(l.len() - stuffed <= MAX_TEXT_LINE);
            }
        }
        if dot {
            let (_, n, done, err) = decode(&out);
            prop_assert!(done);
            prop_assert_eq!(err, None);
            prop_assert_eq!(n, out.len(), "terminator only at the end");
        }
        // Never cut: every octet but CR, LF and NUL is still there, in
        // order (folding only adds CRLF and spaces).
        let keep = |v: &[u8]| -> Vec<u8> {
            v.iter().copied().filter(|b| !matches!(b, b'\r' | b'\n' | 0 | b' ')).collect()
        };
        let (sent, _, _, _) = if dot { decode(&out) } else { (out.clone(), 0, true, None) };
        prop_assert_eq!(keep(&sent), keep(&input));
    }
}
