use super::*;
use crate::dkim::testutil::{self, field_name, pem, runtime_with_keys, split, tags, txt_of};
use std::collections::HashMap;

const MESSAGE: &[u8] = b"Received: from client.example (client.example [192.0.2.1])\r\n\
\tby mx.example.test; Sat, 5 Dec 2026 10:00:00 +0000\r\n\
From: Alice <alice@example.test>\r\n\
To: Bob <bob@remote.example>\r\n\
Subject: Quarterly numbers\r\n\
Date: Sat, 5 Dec 2026 10:00:00 +0000\r\n\
Message-ID: <q4@example.test>\r\n\
MIME-Version: 1.0\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
X-Mailer: test\r\n\
\r\n\
Hello Bob,\r\n\
the numbers are attached.\r\n";

/// Signers with an RSA key (selector "r") and an Ed25519 key (selector
/// [`ED_SELECTOR`]) for example.test, and the DNS records of both.
fn both_keys(extra: &str) -> (Signers, HashMap<String, String>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let rsa = pem(Algorithm::RsaSha256);
    let ed = pem(Algorithm::Ed25519Sha256);
    let runtime = runtime_with_keys(
        dir.path(),
        &[
            ("example.test", "r", rsa),
            ("example.test", ED_SELECTOR, ed),
        ],
        extra,
    )
    .expect("config");
    let signers = Signers::from_config(&runtime.dkim).expect("signers");
    let dns = HashMap::from([
        ("r".to_string(), txt_of(rsa)),
        (ED_SELECTOR.to_string(), txt_of(ed)),
    ]);
    (signers, dns, dir)
}

/// Long enough that the first line of its signatures needs folding.
const ED_SELECTOR: &str = "tern202612-ed25519-second-key";

fn signed(signers: &Signers, message: &[u8]) -> Vec<u8> {
    let mut out = signers.sign("example.test", message).expect("sign");
    out.extend_from_slice(message);
    out
}

/// The tags of every DKIM-Signature field of `message`, top first.
fn signatures(message: &[u8]) -> Vec<HashMap<String, String>> {
    let (fields, _) = split(message);
    fields
        .iter()
        .filter(|f| field_name(f) == "dkim-signature")
        .map(|f| {
            let colon = f.iter().position(|&b| b == b':').unwrap();
            tags(&f[colon + 1..])
        })
        .collect()
}

fn h_list(tags: &HashMap<String, String>) -> Vec<String> {
    tags["h"]
        .split(':')
        .map(|h| h.to_ascii_lowercase())
        .collect()
}

#[test]
fn field_names_are_read_as_written_and_stop_at_the_body() {
    let names = header_field_names(MESSAGE);
    let names: Vec<&str> = names
        .iter()
        .map(|n| std::str::from_utf8(n).unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "Received",
            "From",
            "To",
            "Subject",
            "Date",
            "Message-ID",
            "MIME-Version",
            "Content-Type",
            "X-Mailer"
        ]
    );
    // A line without a colon ends the header, as for mail-auth's parser;
    // "Subject " (space before the colon) keeps its space, so it is not
    // taken for Subject.
    let odd = b"From: a@example.test\r\nSubject : x\r\nno colon here\r\nTo: b@example.test\r\n\r\nbody\r\n";
    let names = header_field_names(odd);
    assert_eq!(names, [&b"From"[..], &b"Subject "[..]]);
    assert!(header_field_names(b"").is_empty());
    assert!(header_field_names(b"\r\nbody").is_empty());
}

#[test]
fn signed_fields_are_the_present_ones_with_from_and_identity_fields_over_signed() {
    let fields = fields_to_sign(MESSAGE);
    assert_eq!(
        fields,
        [
            "From",
            "Subject",
            "Date",
            "Message-ID",
            "To",
            "MIME-Version",
            "Content-Type",
            // Over-signing entries: From always, the others because present.
            "From",
            "Subject",
            "Date",
            "Message-ID",
            "To",
        ]
    );
    // Absent fields are not listed (a list may add List-Id, a re-sender
    // Resent-*), except From, listed once when absent.
    let bare = b"Subject: hi\r\n\r\nbody\r\n";
    assert_eq!(fields_to_sign(bare), ["Subject", "From", "Subject"]);
}

#[test]
fn both_keys_sign_and_an_independent_verifier_accepts_both() {
    let (signers, dns, _dir) = both_keys("");
    let headers = signers.sign("example.test", MESSAGE).unwrap();
    let message = signed(&signers, MESSAGE);
    let sigs = signatures(&message);
    assert_eq!(sigs.len(), 2);
    assert_eq!(sigs[0]["a"], "rsa-sha256");
    assert_eq!(sigs[0]["s"], "r");
    assert_eq!(sigs[1]["a"], "ed25519-sha256");
    assert_eq!(sigs[1]["s"], ED_SELECTOR);
    for sig in &sigs {
        assert_eq!(sig["v"], "1");
        assert_eq!(sig["d"], "example.test");
        assert_eq!(sig["c"], "relaxed/relaxed");
        assert!(sig["t"].parse::<u64>().unwrap() > 1_700_000_000);
        assert!(!sig.contains_key("x"), "no expiry by default");
        assert!(!sig.contains_key("l"), "the whole body is signed");
        assert!(!sig.contains_key("i"));
        let h = h_list(sig);
        assert_eq!(h.iter().filter(|n| *n == "from").count(), 2, "{h:?}");
        assert_eq!(h.iter().filter(|n| *n == "subject").count(), 2, "{h:?}");
        for never in ["received", "x-mailer", "reply-to", "list-id", "resent-from"] {
            assert!(!h.contains(&never.to_string()), "{never} in {h:?}");
        }
    }
    for index in 0..2 {
        testutil::verify(&message, index, &dns)
            .unwrap_or_else(|e| panic!("signature {index}: {e}"));
    }

    // Folding: every line CRLF-terminated, at most 78 octets (RFC 5322
    // §2.1.1), continuation lines start with white space, one field per
    // signature.
    let text = std::str::from_utf8(&headers).unwrap();
    assert!(text.ends_with("\r\n"));
    assert!(!text.replace("\r\n", "").contains(['\r', '\n']));
    let lines: Vec<&str> = text.split_terminator("\r\n").collect();
    assert!(lines.len() > 4, "{text}");
    for line in &lines {
        assert!(line.len() <= 78, "long line {line:?}");
    }
    let starts = lines
        .iter()
        .filter(|l| l.starts_with("DKIM-Signature: "))
        .count();
    assert_eq!(starts, 2);
    assert!(
        lines
            .iter()
            .all(|l| l.starts_with("DKIM-Signature: ") || l.starts_with([' ', '\t'])),
        "{text}"
    );
}

#[test]
fn tampering_breaks_the_signatures_and_relaxed_changes_do_not() {
    let (signers, dns, _dir) = both_keys("");
    let message = signed(&signers, MESSAGE);
    let check = |m: &[u8]| {
        (0..2)
            .map(|i| testutil::verify(m, i, &dns).is_ok())
            .collect::<Vec<_>>()
    };
    assert_eq!(check(&message), [true, true]);

    let replace = |from: &str, to: &str| {
        let text = String::from_utf8(message.clone()).unwrap();
        assert!(text.contains(from));
        text.replacen(from, to, 1).into_bytes()
    };
    // A changed subject or body.
    assert_eq!(
        check(&replace("Quarterly numbers", "Quarterly numbers!")),
        [false, false]
    );
    assert_eq!(
        check(&replace("are attached", "are not attached")),
        [false, false]
    );
    // A second From: or Subject: added above the signed ones (what a
    // reader may show): over-signing makes the verifier take it.
    let mut second_from = b"From: Mallory <ceo@example.test>\r\n".to_vec();
    second_from.extend_from_slice(&message);
    assert_eq!(check(&second_from), [false, false]);
    let mut second_subject = message.clone();
    let at = find(&second_subject, b"X-Mailer:");
    second_subject.splice(at..at, b"Subject: Pay this invoice\r\n".iter().copied());
    assert_eq!(check(&second_subject), [false, false]);
    // A field that is not signed may be added (a relay's Received).
    let mut received = b"Received: from mx.example.test by mx.remote.example\r\n".to_vec();
    received.extend_from_slice(&message);
    assert_eq!(check(&received), [true, true]);
    // Relaxed canonicalization: re-folding, white space runs, case of
    // field names, trailing white space and empty lines at the end.
    let refolded = replace(
        "To: Bob <bob@remote.example>",
        "to:   Bob\r\n\t <bob@remote.example>  ",
    );
    assert_eq!(check(&refolded), [true, true]);
    let mut trailing = replace("the numbers are", "the  numbers \t are");
    trailing.extend_from_slice(b"\r\n\r\n");
    assert_eq!(check(&trailing), [true, true]);
}

fn find(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap()
}

#[test]
fn odd_white_space_and_folding_in_the_message_are_signed_verifiably() {
    let (signers, dns, _dir) = both_keys("");
    let odd = b"From:   \"Alice  Example\"\r\n  <alice@example.test>  \r\n\
SUBJECT:\tfolded\r\n\tover   three\r\n lines\t\r\n\
to: bob@remote.example\r\n\
Reply-To: <replies@example.test>\r\n\
Cc: a@remote.example\r\n\
Cc: b@remote.example\r\n\
\r\n\
  leading spaces\t and  tabs \t\r\n\
\r\n\
trailing empty lines follow\r\n\
\r\n\
\r\n";
    let message = signed(&signers, odd);
    for index in 0..2 {
        testutil::verify(&message, index, &dns)
            .unwrap_or_else(|e| panic!("signature {index}: {e}"));
    }
    let sig = &signatures(&message)[0];
    let h = h_list(sig);
    // Both Cc instances, plus one over-signing entry; Reply-To over-signed.
    assert_eq!(h.iter().filter(|n| *n == "cc").count(), 3, "{h:?}");
    assert_eq!(h.iter().filter(|n| *n == "reply-to").count(), 2, "{h:?}");
    assert_eq!(h.iter().filter(|n| *n == "subject").count(), 2, "{h:?}");
}

#[test]
fn a_domain_without_keys_gets_nothing_and_domains_match_in_any_case() {
    let (signers, _, _dir) = both_keys("");
    assert!(signers.sign("remote.example", MESSAGE).unwrap().is_empty());
    assert!(signers.sign("other.test", MESSAGE).unwrap().is_empty());
    assert!(!signers.signs_for("other.test"));
    assert!(signers.signs_for("Example.TEST"));
    assert_eq!(signatures(&signed(&signers, MESSAGE)).len(), 2);
    let upper = signers.sign("EXAMPLE.test", MESSAGE).unwrap();
    assert_eq!(signatures(&upper).len(), 2);
    assert_eq!(signatures(&upper)[0]["d"], "example.test");
    assert_eq!(
        signers.keys(),
        [
            (
                "example.test".to_string(),
                "r".to_string(),
                Algorithm::RsaSha256
            ),
            (
                "example.test".to_string(),
                ED_SELECTOR.to_string(),
                Algorithm::Ed25519Sha256
            ),
        ]
    );
    let empty = Signers::from_config(
        &runtime_with_keys(tempfile::tempdir().unwrap().path(), &[], "")
            .unwrap()
            .dkim,
    )
    .unwrap();
    assert!(empty.is_empty());
}

#[test]
fn an_international_domain_matches_as_u_label_and_a_label() {
    let dir = tempfile::tempdir().unwrap();
    let named = "[[dkim.key]]\ndomain = \"Bücher.example\"\nselector = \"s1\"\n";
    let path = crate::dkim::key_path(&dir.path().join("dkim"), "bücher.example", "s1");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, pem(Algorithm::Ed25519Sha256)).unwrap();
    let runtime = runtime_with_keys(dir.path(), &[], named).unwrap();
    let signers = Signers::from_config(&runtime.dkim).unwrap();
    assert!(signers.signs_for("bücher.example"));
    assert!(signers.signs_for("XN--BCHER-KVA.example."));
    let fields = signers.sign("xn--bcher-kva.example", MESSAGE).unwrap();
    let mut message = fields;
    message.extend_from_slice(MESSAGE);
    let sig = &signatures(&message)[0];
    assert_eq!(sig["d"], "xn--bcher-kva.example", "d= is the A-label");
    let dns = HashMap::from([("s1".to_string(), txt_of(pem(Algorithm::Ed25519Sha256)))]);
    testutil::verify(&message, 0, &dns).unwrap();
}

#[test]
fn signature_lifetime_sets_x() {
    let (signers, dns, _dir) = both_keys("[dkim]\nsignature_lifetime = \"7d\"\n");
    let message = signed(&signers, MESSAGE);
    for sig in signatures(&message) {
        let t: u64 = sig["t"].parse().unwrap();
        let x: u64 = sig["x"].parse().unwrap();
        assert_eq!(x - t, 7 * 24 * 3600);
    }
    testutil::verify(&message, 0, &dns).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_async_signs_on_the_blocking_pool() {
    let (signers, dns, _dir) = both_keys("");
    let body = Bytes::from_static(MESSAGE);
    let headers = signers
        .sign_async("example.test", body.clone())
        .await
        .unwrap();
    let mut message = headers;
    message.extend_from_slice(&body);
    for index in 0..2 {
        testutil::verify(&message, index, &dns).unwrap();
    }
    let none = signers.sign_async("remote.example", body).await.unwrap();
    assert!(none.is_empty());
}

#[test]
fn a_key_gone_since_the_config_was_loaded_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime_with_keys(
        dir.path(),
        &[("example.test", "r", pem(Algorithm::RsaSha256))],
        "",
    )
    .unwrap();
    std::fs::write(&runtime.dkim.keys[0].path, "not a key").unwrap();
    let errors = Signers::from_config(&runtime.dkim).unwrap_err();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].key, "dkim.dir");
    assert!(
        errors[0].message.contains("DKIM key r for example.test"),
        "{}",
        errors[0].message
    );
    assert!(errors[0].message.contains("r.key"), "{}", errors[0].message);
}

/// Signing cost per 4 KiB message, per algorithm:
/// `cargo test -p tern --lib dkim::sign::tests::signing_cost -- --ignored --nocapture`
/// (a debug build: mail-auth's canonicalization is unoptimized there, the
/// crypto is aws-lc's optimized C either way).
#[test]
#[ignore]
fn signing_cost() {
    let mut message = MESSAGE.to_vec();
    while message.len() < 4096 {
        message.extend_from_slice(
            b"The quick brown fox jumps over the lazy dog, again and again.\r\n",
        );
    }
    for (algorithm, selector) in [(Algorithm::RsaSha256, "r"), (Algorithm::Ed25519Sha256, "e")] {
        let dir = tempfile::tempdir().unwrap();
        let runtime = runtime_with_keys(
            dir.path(),
            &[("example.test", selector, pem(algorithm))],
            "",
        )
        .unwrap();
        let signers = Signers::from_config(&runtime.dkim).unwrap();
        let rounds = 500;
        let start = std::time::Instant::now();
        for _ in 0..rounds {
            std::hint::black_box(signers.sign("example.test", &message).unwrap());
        }
        let per = start.elapsed() / rounds;
        println!("{algorithm}: {per:?} per {} byte message", message.len());
    }
}
