//! Tests for `data`: framing, unstuffing, bare CR/LF handling and limits.

use super::*;

#[test]
fn no_line_limit_passes_any_line_length() {
    let mut dec = ContentDecoder::dot(ContentLimits {
        max_line: 0,
        ..limits(BareLfPolicy::Reject)
    });
    let mut input = b"To: ".to_vec();
    input.extend(std::iter::repeat_n(b'a', 100_000));
    input.extend_from_slice(b"\r\n\r\n.x\r\n.\r\n");
    for step in [1, 7, 4096, input.len()] {
        let mut dec = dec.clone();
        let (out, used, done) = decode(&mut dec, &input, step);
        assert!(done && used == input.len() && dec.error().is_none());
        assert_eq!(out, [&input[..input.len() - 7], b"x\r\n"].concat());
    }
    // A limit set: the same line is refused.
    dec = ContentDecoder::dot(limits(BareLfPolicy::Reject));
    let (_, _, done) = decode(&mut dec, &input, 4096);
    assert!(done);
    assert_eq!(dec.error(), Some(ContentError::LineTooLong));
}

fn limits(bare_lf: BareLfPolicy) -> ContentLimits {
    ContentLimits {
        max_size: 0,
        max_line: 1000,
        max_received: 50,
        bare_lf,
        nul: NulPolicy::Reject,
    }
}

/// Feeds `input` in pieces of `step` bytes; returns (body, consumed, done).
fn decode(dec: &mut ContentDecoder, input: &[u8], step: usize) -> (Vec<u8>, usize, bool) {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < input.len() {
        let end = (pos + step).min(input.len());
        let (n, done) = dec.feed(&input[pos..end], &mut out);
        pos += n;
        if done {
            return (out, pos, true);
        }
    }
    (out, pos, false)
}

#[test]
fn terminator_and_unstuffing() {
    for step in [1, 2, 3, 1000] {
        let mut d = ContentDecoder::dot(limits(BareLfPolicy::Reject));
        let input = b"a\r\n..b\r\n.c\r\n...\r\n.\r\nNEXT";
        let (out, n, done) = decode(&mut d, input, step);
        assert!(done);
        assert_eq!(n, input.len() - 4);
        assert_eq!(out, b"a\r\n.b\r\nc\r\n..\r\n");
        assert_eq!(d.error(), None);
    }
}

#[test]
fn first_line_dot_ends_immediately() {
    let mut d = ContentDecoder::dot(limits(BareLfPolicy::Reject));
    let (out, n, done) = decode(&mut d, b".\r\nQUIT\r\n", 1000);
    assert!(done && out.is_empty() && n == 3);
}

#[test]
fn bare_endings_never_terminate() {
    for input in [
        &b"a\n.\nb"[..],
        b"a\n.\r\nb",
        b"a\r\n.\nb",
        b"a\r.\rb",
        b"a\r\n.\rb",
        b"a\r\n\r.\r\nb",
        b"a\r\n.\r\r\nb",
    ] {
        for policy in [BareLfPolicy::Reject, BareLfPolicy::Normalize] {
            let mut d = ContentDecoder::dot(limits(policy));
            let (_, n, done) = decode(&mut d, input, 1);
            assert!(!done, "{input:?} {policy:?}");
            assert_eq!(n, input.len());
            if policy == BareLfPolicy::Reject {
                assert_eq!(d.error(), Some(ContentError::BareLineEnding), "{input:?}");
            } else {
                assert_eq!(d.error(), None);
            }
        }
    }
}

#[test]
fn normalize_turns_bare_endings_into_crlf() {
    let mut d = ContentDecoder::dot(limits(BareLfPolicy::Normalize));
    let (out, _, done) = decode(&mut d, b"a\nb\rc\r\n..d\n..e\r\n.\r\n", 1);
    assert!(done);
    // "..e" after a bare LF is not at a real line start: not unstuffed.
    assert_eq!(out, b"a\r\nb\r\nc\r\n.d\r\n..e\r\n");
}

#[test]
fn line_length_excludes_the_stuffing_dot() {
    let lim = ContentLimits {
        max_line: 6,
        ..limits(BareLfPolicy::Reject)
    };
    let mut d = ContentDecoder::dot(lim);
    decode(&mut d, b"..abc\r\nabcd\r\n", 1);
    assert_eq!(d.error(), None);
    decode(&mut d, b"abcde\r\n.\r\n", 1);
    assert_eq!(d.error(), Some(ContentError::LineTooLong));
}

#[test]
fn size_limit_stops_output_but_reads_on() {
    let lim = ContentLimits {
        max_size: 5,
        ..limits(BareLfPolicy::Reject)
    };
    let mut d = ContentDecoder::dot(lim);
    let (out, _, done) = decode(&mut d, b"abc\r\ndef\r\n.\r\n", 1000);
    assert!(done);
    assert_eq!(d.error(), Some(ContentError::TooLarge));
    assert_eq!(out, b"abc\r\n");
    assert_eq!(d.size(), 10);
}

#[test]
fn received_counted_in_headers_only() {
    let lim = ContentLimits {
        max_received: 1,
        ..limits(BareLfPolicy::Reject)
    };
    let mut d = ContentDecoder::dot(lim);
    decode(
        &mut d,
        b"Received: x\r\nX-Received: y\r\n\r\nReceived: z\r\n.\r\n",
        1,
    );
    assert_eq!(d.error(), None);
    let mut d = ContentDecoder::dot(lim);
    decode(&mut d, b"Received: x\r\nReceived\t: y\r\n\r\n.\r\n", 1);
    assert_eq!(d.error(), Some(ContentError::TooManyHops));
}

#[test]
fn chunked_mode_is_raw() {
    let mut d = ContentDecoder::chunked(limits(BareLfPolicy::Reject));
    let mut out = Vec::new();
    let (n, done) = d.feed(b"..a\r\n.\r\nb\r", &mut out);
    assert_eq!((n, done), (10, false));
    d.feed(b"\n", &mut out);
    d.finish(&mut out);
    assert_eq!(out, b"..a\r\n.\r\nb\r\n");
    assert_eq!(d.error(), None);
    let mut d = ContentDecoder::chunked(limits(BareLfPolicy::Reject));
    d.feed(b"x\r", &mut out);
    d.finish(&mut out);
    assert_eq!(d.error(), Some(ContentError::BareLineEnding));
}

#[test]
fn error_replies() {
    assert_eq!(
        ContentError::BareLineEnding.reply().to_string(),
        "550 5.5.2 Error: bare <LF> or <CR> in message"
    );
    assert_eq!(
        ContentError::TooLarge.reply().to_string(),
        "552 5.3.4 Error: message too large"
    );
    assert_eq!(
        ContentError::TooManyHops.reply().to_string(),
        "554 5.4.6 Error: too many hops"
    );
    assert_eq!(
        ContentError::LineTooLong.reply().to_string(),
        "554 5.6.0 Error: message line too long"
    );
    assert_eq!(
        ContentError::Nul.reply().to_string(),
        "550 5.6.0 Error: NUL octet in message"
    );
}

/// The inputs that become an end of data once a downstream server drops
/// NULs: each stays content here, and the message is refused (or, under
/// `Strip`, delivered without its NULs, still as one message).
const NUL_SMUGGLING: &[&[u8]] = &[
    b"a\r\n\0.\r\nMAIL FROM:<x@y>\r\n.\r\n",
    b"a\r\n.\0\r\nMAIL FROM:<x@y>\r\n.\r\n",
    b"a\r\n\0.\0\r\nb\r\n.\r\n",
    b"\0\r\n.\r\n",
];

#[test]
fn nul_is_refused_at_the_real_end_of_data() {
    for input in NUL_SMUGGLING {
        for step in [1, 3, input.len()] {
            let mut d = ContentDecoder::dot(limits(BareLfPolicy::Reject));
            let (_, used, done) = decode(&mut d, input, step);
            assert!(done, "{input:?}");
            assert_eq!(used, input.len(), "ends only at the real terminator");
            assert_eq!(d.error(), Some(ContentError::Nul), "{input:?}");
        }
    }
}

#[test]
fn nul_is_dropped_under_strip() {
    let lim = ContentLimits {
        nul: NulPolicy::Strip,
        ..limits(BareLfPolicy::Reject)
    };
    let mut d = ContentDecoder::dot(lim);
    let input = b"a\0b\r\n\0.\r\n.\0\r\n..\r\n.\r\n";
    let (out, used, done) = decode(&mut d, input, 1);
    assert!(done);
    assert_eq!(used, input.len());
    assert_eq!(d.error(), None);
    assert_eq!(out, b"ab\r\n.\r\n\r\n.\r\n");
    assert_eq!(d.size(), out.len() as u64);
}

#[test]
fn nul_in_bdat_chunks_is_refused() {
    let mut d = ContentDecoder::chunked(limits(BareLfPolicy::Reject));
    let mut out = Vec::new();
    d.feed(b"Subject: x\r\n\r\nbody\0\r\n", &mut out);
    d.finish(&mut out);
    assert_eq!(d.error(), Some(ContentError::Nul));
    assert!(!out.contains(&0));
}

mod split_equivalence {
    use super::*;
    use proptest::prelude::*;

    /// Bytes rich in the characters that matter: CR, LF, dots, and a header
    /// name, so runs, line ends and terminators all occur.
    fn content() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(
            prop_oneof![
                Just(b"\r".to_vec()),
                Just(b"\n".to_vec()),
                Just(b"\r\n".to_vec()),
                Just(b".".to_vec()),
                Just(b"Received: x".to_vec()),
                Just(b"\r\n\r\n".to_vec()),
                Just(b"\0".to_vec()),
                proptest::collection::vec(b'a'..=b'z', 1..40),
            ],
            0..60,
        )
        .prop_map(|parts| parts.concat())
    }

    fn run(
        dec: &mut ContentDecoder,
        input: &[u8],
        step: usize,
    ) -> (Vec<u8>, usize, bool, Option<ContentError>, u64) {
        let (out, used, done) = decode(dec, input, step);
        (out, used, done, dec.error(), dec.size())
    }

    proptest! {
        /// The bulk path for ordinary bytes must be indistinguishable from
        /// feeding one byte at a time: same output, same end, same first
        /// error, same size, under tight limits that runs cross.
        #[test]
        fn whole_input_equals_byte_at_a_time(
            input in content(),
            // 0: no line limit (the server's default).
            max_line in prop_oneof![Just(0usize), 3usize..60],
            max_size in 0u64..300,
            max_received in 0usize..3,
            dot in any::<bool>(),
            normalize in any::<bool>(),
            strip in any::<bool>(),
        ) {
            let limits = ContentLimits {
                max_size,
                max_line,
                max_received,
                bare_lf: if normalize { BareLfPolicy::Normalize } else { BareLfPolicy::Reject },
                nul: if strip { NulPolicy::Strip } else { NulPolicy::Reject },
            };
            let make = || if dot { ContentDecoder::dot(limits) } else { ContentDecoder::chunked(limits) };
            let whole = run(&mut make(), &input, input.len().max(1));
            let bytewise = run(&mut make(), &input, 1);
            prop_assert_eq!(whole, bytewise);
        }

        /// Whatever the policy and however the input is split, no NUL is
        /// ever emitted, and a NUL under `Reject` always refuses the message.
        #[test]
        fn no_nul_is_ever_emitted(
            input in content(),
            step in 1usize..50,
            dot in any::<bool>(),
            strip in any::<bool>(),
        ) {
            let limits = ContentLimits {
                nul: if strip { NulPolicy::Strip } else { NulPolicy::Reject },
                ..limits(BareLfPolicy::Normalize)
            };
            let mut dec = if dot { ContentDecoder::dot(limits) } else { ContentDecoder::chunked(limits) };
            let (out, used, _, error, _) = run(&mut dec, &input, step);
            prop_assert!(!out.contains(&0));
            if !strip && input[..used].contains(&0) {
                // The first problem is reported: a long line may come first.
                prop_assert!(error.is_some());
            }
        }
    }
}
