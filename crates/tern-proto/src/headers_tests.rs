//! Tests for `headers`: which `Authentication-Results:` fields go, and that
//! the output never depends on how the input is split.

use super::*;
use proptest::prelude::*;

fn filter_in_pieces(input: &[u8], step: usize) -> Vec<u8> {
    let mut f = ForgedResultsFilter::new("mx.test");
    let mut out = Vec::new();
    let mut scratch = Vec::new();
    for piece in input.chunks(step.max(1)) {
        out.extend_from_slice(f.feed(piece, &mut scratch));
    }
    f.finish(&mut out);
    out
}

fn filter(input: &[u8]) -> Vec<u8> {
    filter_in_pieces(input, input.len())
}

#[test]
fn forged_results_under_our_name_are_removed_with_their_continuations() {
    let input = b"Received: from x\r\n\tby y\r\n\
Authentication-Results: mx.test; spf=pass smtp.mailfrom=a@b\r\n\tdkim=pass header.d=b\r\n\
Authentication-Results: other.test; spf=fail\r\n\
authentication-results :  (forged) \"MX.TEST\" 1; dmarc=pass\r\n\
Authentication-Results:\r\n mx.test.;\r\n  none\r\n\
Subject: hi\r\n\
\r\n\
Authentication-Results: mx.test; in the body, untouched\r\n";
    let expected = b"Received: from x\r\n\tby y\r\n\
Authentication-Results: other.test; spf=fail\r\n\
Subject: hi\r\n\
\r\n\
Authentication-Results: mx.test; in the body, untouched\r\n";
    for step in [1, 2, 7, input.len()] {
        assert_eq!(
            String::from_utf8_lossy(&filter_in_pieces(input, step)),
            String::from_utf8_lossy(expected),
            "step {step}"
        );
    }
}

#[test]
fn look_alike_names_and_ids_stay() {
    for keep in [
        &b"Authentication-Results: mx.test.evil; spf=pass\r\n\r\n"[..],
        b"Authentication-Results: evil-mx.test; spf=pass\r\n\r\n",
        b"X-Authentication-Results: mx.test; spf=pass\r\n\r\n",
        b"Authentication-Results-X: mx.test; spf=pass\r\n\r\n",
        b"ARC-Authentication-Results: i=1; mx.test; spf=pass\r\n\r\n",
        b"Authentication-Results: (mx.test) other.test; none\r\n\r\n",
        b"Subject: no colon line follows\r\nAuthentication-Results\r\n\r\n",
    ] {
        assert_eq!(filter(keep), keep, "{}", String::from_utf8_lossy(keep));
    }
}

#[test]
fn a_message_without_a_body_or_blank_line_is_filtered_too() {
    assert_eq!(
        filter(b"Subject: x\r\nAuthentication-Results: mx.test; none\r\n"),
        b"Subject: x\r\n"
    );
    assert_eq!(filter(b"Authentication-Results: mx.test; none"), b"");
    assert_eq!(filter(b""), b"");
    assert_eq!(filter(b"\r\nbody"), b"\r\nbody");
}

#[test]
fn an_absurdly_long_results_field_is_removed_and_memory_stays_bounded() {
    let mut input = b"Authentication-Results: (".to_vec();
    for _ in 0..2000 {
        input.extend_from_slice(b"\r\n comment comment comment comment comment comment");
    }
    input.extend_from_slice(b") other.test; none\r\nSubject: x\r\n\r\nbody\r\n");
    assert_eq!(filter(&input), b"Subject: x\r\n\r\nbody\r\n");
}

#[test]
fn the_body_is_passed_without_a_copy() {
    let mut f = ForgedResultsFilter::new("mx.test");
    let mut scratch = Vec::new();
    let mut out = f.feed(b"Subject: x\r\n\r\n", &mut scratch).to_vec();
    let body = b"Authentication-Results: mx.test; none\r\n".to_vec();
    let passed = f.feed(&body, &mut scratch);
    assert!(std::ptr::eq(passed, body.as_slice()));
    out.extend_from_slice(passed);
    assert!(out.ends_with(&body));
}

proptest! {
    /// However the input is split, the output is the same; and it is the
    /// input once no field names our host.
    #[test]
    fn output_does_not_depend_on_the_split(
        parts in proptest::collection::vec(prop_oneof![
            Just(b"Authentication-Results: mx.test; none\r\n".to_vec()),
            Just(b"Authentication-Results: a.test; none\r\n".to_vec()),
            Just(b" folded\r\n".to_vec()),
            Just(b"Subject: s\r\n".to_vec()),
            Just(b"\r\n".to_vec()),
            Just(b"\r".to_vec()),
            Just(b"\n".to_vec()),
            proptest::collection::vec(any::<u8>(), 0..20),
        ], 0..20),
        step in 1usize..30,
    ) {
        let input = parts.concat();
        let whole = filter(&input);
        prop_assert_eq!(&filter_in_pieces(&input, step), &whole);
        let ours = b"mx.test";
        if !input.windows(ours.len()).any(|w| w.eq_ignore_ascii_case(ours)) {
            prop_assert_eq!(whole, input);
        }
    }
}
