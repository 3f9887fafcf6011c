//! Transcript tests of message content: SMTP smuggling, BDAT, byte-by-byte
//! feeding, and a property test over arbitrary input.

use super::tests::{accept, body, config, count, drain, replies, run, run_events_with};
use super::*;
use proptest::prelude::*;

const HEAD: &[u8] = b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@b>\r\nDATA\r\n";
const SMUGGLED: &[u8] = b"MAIL FROM:<x@y>\r\nRCPT TO:<z@w>\r\nDATA\r\nsmuggled\r\n";

fn smuggle(sep: &[u8], policy: BareLfPolicy) -> Vec<Event> {
    let cfg = ServerConfig {
        bare_lf: policy,
        ..config()
    };
    let mut content = b"Subject: a\r\n\r\nfirst".to_vec();
    content.extend_from_slice(sep);
    content.extend_from_slice(SMUGGLED);
    content.extend_from_slice(b".\r\n");
    run_events_with(cfg, &[HEAD, &content, b"NOOP\r\n"], accept)
}

const SEPARATORS: [&[u8]; 5] = [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r\n.\r"];

#[test]
fn smuggling_is_rejected_as_one_message() {
    for sep in SEPARATORS {
        let ev = smuggle(sep, BareLfPolicy::Reject);
        let out = replies(&ev);
        assert!(
            out.ends_with("354 End data with <CR><LF>.<CR><LF>\r\n550 5.5.2 Error: bare <LF> or <CR> in message\r\n250 2.0.0 Ok\r\n"),
            "{sep:?}: {out}"
        );
        assert_eq!(
            count(&ev, |e| matches!(e, Event::Query(Query::Mail { .. }))),
            1,
            "{sep:?}"
        );
        assert_eq!(
            count(&ev, |e| *e == Event::Query(Query::EndOfData)),
            0,
            "{sep:?}"
        );
        assert_eq!(
            count(&ev, |e| *e
                == Event::MessageAborted(Some(ContentError::BareLineEnding))),
            1,
            "{sep:?}"
        );
    }
}

#[test]
fn smuggling_is_normalized_into_one_message() {
    for sep in SEPARATORS {
        let ev = smuggle(sep, BareLfPolicy::Normalize);
        assert_eq!(
            count(&ev, |e| matches!(e, Event::Query(Query::Mail { .. }))),
            1,
            "{sep:?}"
        );
        assert_eq!(
            count(&ev, |e| *e == Event::Query(Query::EndOfData)),
            1,
            "{sep:?}"
        );
        let b = body(&ev);
        let text = String::from_utf8_lossy(&b);
        assert!(text.contains("MAIL FROM:<x@y>\r\n"), "{sep:?}: {text}");
        // Every line end in the body is CRLF.
        for (i, &c) in b.iter().enumerate() {
            if c == b'\n' {
                assert_eq!(b.get(i.wrapping_sub(1)), Some(&b'\r'), "{sep:?}");
            }
            if c == b'\r' {
                assert_eq!(b.get(i + 1), Some(&b'\n'), "{sep:?}");
            }
        }
        assert!(b.ends_with(b"smuggled\r\n"));
    }
}

#[test]
fn bdat_chunks() {
    let ev = run_events_with(
        config(),
        &[
            b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@b>\r\nBDAT 9\r\nA: b\r\n\r\n",
            b"xBDAT 8 LAST\r\n\r\nQUI",
            b"T\r\nNOOP\r\n",
        ],
        accept,
    );
    assert!(replies(&ev).ends_with(
        "250 2.1.5 Ok\r\n250 2.0.0 9 octets received\r\n250 2.0.0 Ok\r\n250 2.0.0 Ok\r\n"
    ));
    assert_eq!(body(&ev), b"A: b\r\n\r\nx\r\nQUIT\r\n");
    assert_eq!(count(&ev, |e| *e == Event::Query(Query::Data)), 1);
    assert_eq!(count(&ev, |e| *e == Event::Query(Query::EndOfData)), 1);
}

#[test]
fn bdat_zero_last_and_binary_safe_dots() {
    let ev = run_events_with(
        config(),
        &[b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@b>\r\nBDAT 7\r\n.\r\n.\r\n.BDAT 0 LAST\r\n"],
        accept,
    );
    assert_eq!(body(&ev), b".\r\n.\r\n.");
    assert!(replies(&ev).ends_with("250 2.0.0 7 octets received\r\n250 2.0.0 Ok\r\n"));
    let ev = run_events_with(
        config(),
        &[b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@b>\r\nBDAT 0 LAST\r\n"],
        accept,
    );
    assert_eq!(count(&ev, |e| *e == Event::Query(Query::EndOfData)), 1);
}

#[test]
fn refused_bdat_swallows_its_octets() {
    // Without MAIL and without recipients: the octets hold a command
    // that must never be executed.
    let out = run(&[b"EHLO c\r\nBDAT 6\r\nQUIT\r\nNOOP\r\nMAIL FROM:<a@b>\r\nBDAT 6 LAST\r\nQUIT\r\nNOOP\r\n"], accept);
    assert!(out.ends_with(
        "503 5.5.1 Error: need MAIL command\r\n250 2.0.0 Ok\r\n250 2.1.0 Ok\r\n554 5.5.1 Error: no valid recipients\r\n250 2.0.0 Ok\r\n"
    ));
    // Rejected by policy at the first chunk.
    let out = run(
        &[b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@b>\r\nBDAT 6\r\nQUIT\r\nNOOP\r\n"],
        |q| match q {
            Query::Data => Decision::Reject(Reply::new(554, Some(EnhancedCode(5, 7, 1)), "no")),
            _ => Decision::Accept,
        },
    );
    assert!(out.ends_with("554 5.7.1 no\r\n250 2.0.0 Ok\r\n"));
}

#[test]
fn bdat_size_limit_spans_chunks() {
    let cfg = ServerConfig {
        max_message_size: 8,
        ..config()
    };
    let ev = run_events_with(
        cfg,
        &[b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@b>\r\nBDAT 5\r\n12345BDAT 5\r\n67890BDAT 1 LAST\r\nx", b"NOOP\r\n"],
        accept,
    );
    assert!(replies(&ev).ends_with(
        "250 2.0.0 5 octets received\r\n552 5.3.4 Error: message too large\r\n503 5.5.1 Error: need MAIL command\r\n250 2.0.0 Ok\r\n"
    ));
    assert_eq!(
        count(&ev, |e| *e
            == Event::MessageAborted(Some(ContentError::TooLarge))),
        1
    );
}

#[test]
fn bdat_sequencing() {
    let ev = run_events_with(
        config(),
        &[
            b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@b>\r\nBDAT 2\r\nabDATA\r\n",
            b"RCPT TO:<y@b>\r\nRSET\r\nBDAT 1\r\nz",
        ],
        accept,
    );
    assert!(replies(&ev).ends_with(
        "250 2.0.0 2 octets received\r\n503 5.5.1 Error: DATA after BDAT\r\n503 5.5.1 Error: need MAIL command\r\n\
250 2.0.0 Ok\r\n503 5.5.1 Error: need MAIL command\r\n"
    ));
    // RSET aborted the streamed chunk.
    assert_eq!(count(&ev, |e| *e == Event::MessageAborted(None)), 1);
}

#[test]
fn bdat_bare_lf_policy() {
    let ev = run_events_with(
        config(),
        &[b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@b>\r\nBDAT 4 LAST\r\na\nb\r"],
        accept,
    );
    assert!(replies(&ev).ends_with("550 5.5.2 Error: bare <LF> or <CR> in message\r\n"));
    let cfg = ServerConfig {
        bare_lf: BareLfPolicy::Normalize,
        ..config()
    };
    let ev = run_events_with(
        cfg,
        &[b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@b>\r\nBDAT 4 LAST\r\na\nb\r"],
        accept,
    );
    assert_eq!(body(&ev), b"a\r\nb\r\n");
}

const TRANSCRIPT: &[u8] = b"EHLO c.test\r\nMAIL FROM:<a@b> SIZE=20\r\nRCPT TO:<x@b>\r\nRCPT TO:<bad@b>\r\nDATA\r\n\
Subject: x\r\n\r\n..a\r\nb\n.\r\n.\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@b>\r\nBDAT 3\r\n\r\n.BDAT 2 LAST\r\n\r\n\
NOOP\r\nFOO\r\nNOOP \x01\r\nVRFY x\r\nQUIT\r\n";

#[test]
fn long_lines_are_content_by_default() {
    // A 3.5 KB To: line (swaks, 150 recipients) and a 5000-octet body line,
    // in DATA and in BDAT, arrive byte for byte.
    let mut msg = b"To: ".to_vec();
    for i in 0..150 {
        msg.extend_from_slice(format!("user{i:03}@example.test, ").as_bytes());
    }
    msg.extend_from_slice(b"last@example.test\r\n\r\n");
    msg.extend(std::iter::repeat_n(b'b', 5000));
    msg.extend_from_slice(b"\r\n");
    let mut data = msg.clone();
    data.extend_from_slice(b".\r\n");
    let ev = run_events_with(config(), &[HEAD, &data], accept);
    assert!(replies(&ev).ends_with("354 End data with <CR><LF>.<CR><LF>\r\n250 2.0.0 Ok\r\n"));
    assert_eq!(body(&ev), msg);
    let bdat = format!("BDAT {} LAST\r\n", msg.len());
    let head: &[u8] = b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@b>\r\n";
    let ev = run_events_with(config(), &[head, bdat.as_bytes(), &msg], accept);
    assert!(replies(&ev).ends_with("250 2.0.0 Ok\r\n"));
    assert_eq!(body(&ev), msg);
}

#[test]
fn a_configured_line_limit_refuses_the_message_and_the_session_goes_on() {
    let cfg = ServerConfig {
        max_text_line: 1000,
        ..config()
    };
    let mut long = vec![b'x'; 1001];
    long.extend_from_slice(b"\r\n.\r\n");
    let ev = run_events_with(
        cfg,
        &[
            HEAD,
            &long,
            b"RSET\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@b>\r\nDATA\r\n",
            b"ok\r\n.\r\n",
        ],
        accept,
    );
    assert!(
        replies(&ev).ends_with(
            "554 5.6.0 Error: message line too long\r\n250 2.0.0 Ok\r\n250 2.1.0 Ok\r\n\
             250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n250 2.0.0 Ok\r\n"
        ),
        "{}",
        replies(&ev)
    );
    assert_eq!(count(&ev, |e| *e == Event::Query(Query::EndOfData)), 1);
    // Exactly 1000 octets with CRLF is within the limit.
    let mut fits = vec![b'x'; 998];
    fits.extend_from_slice(b"\r\n.\r\n");
    let cfg = ServerConfig {
        max_text_line: 1000,
        ..config()
    };
    let ev = run_events_with(cfg, &[HEAD, &fits], accept);
    assert!(replies(&ev).ends_with("250 2.0.0 Ok\r\n"));
}

#[test]
fn one_huge_line_is_bounded_by_the_size_limit() {
    // 4 MiB without a line end, fed in 64 KiB reads (as the driver does):
    // the session holds no more than one read, emits no more than the size
    // limit, and refuses the message as too large.
    let cfg = ServerConfig {
        max_message_size: 100_000,
        ..config()
    };
    let mut s = Session::new(cfg);
    let mut log = Vec::new();
    let mut decide = accept;
    drain(&mut s, &mut decide, &mut log);
    s.receive(HEAD);
    drain(&mut s, &mut decide, &mut log);
    let read = vec![b'y'; 64 * 1024];
    for _ in 0..64 {
        s.receive(&read);
        drain(&mut s, &mut decide, &mut log);
        assert!(s.input.is_empty());
    }
    s.receive(b"\r\n.\r\n");
    drain(&mut s, &mut decide, &mut log);
    assert!(body(&log).len() <= 100_000);
    assert!(replies(&log).ends_with("552 5.3.4 Error: message too large\r\n"));
}

fn transcript_decide(q: &Query) -> Decision {
    match q {
        Query::Rcpt {
            to: ForwardPath::Mailbox(m),
            ..
        } if m.local_part == "bad" => {
            Decision::Reject(Reply::new(550, Some(EnhancedCode(5, 1, 1)), "unknown"))
        }
        Query::EndOfData => Decision::Queued {
            queue_id: "ID".into(),
        },
        _ => Decision::Accept,
    }
}

#[test]
fn byte_at_a_time_gives_the_same_events() {
    for policy in [BareLfPolicy::Reject, BareLfPolicy::Normalize] {
        let cfg = ServerConfig {
            bare_lf: policy,
            ..config()
        };
        // DATA must end its group, so "whole" is two reads split there.
        let at = TRANSCRIPT
            .windows(6)
            .position(|w| w == b"DATA\r\n")
            .unwrap_or(0)
            + 6;
        let (a, b) = TRANSCRIPT.split_at(at);
        let whole = run_events_with(cfg.clone(), &[a, b], transcript_decide);
        let bytes: Vec<&[u8]> = TRANSCRIPT.chunks(1).collect();
        let split = run_events_with(cfg, &bytes, transcript_decide);
        assert_eq!(replies(&whole), replies(&split));
        assert_eq!(body(&whole), body(&split));
        assert_eq!(whole.last(), Some(&Event::Close));
        assert_eq!(split.last(), Some(&Event::Close));
    }
}

/// Checks the invariants every session must keep, whatever the input.
fn check_invariants(events: &[Event]) -> Result<(), TestCaseError> {
    let mut closed = false;
    for e in events {
        prop_assert!(!closed, "event after Close: {:?}", e);
        match e {
            Event::Reply(r) => {
                let bytes = r.to_bytes();
                let (back, n) =
                    Reply::parse(&bytes).map_err(|e| TestCaseError::fail(format!("{e}: {r}")))?;
                prop_assert_eq!(n, bytes.len());
                prop_assert_eq!(back.code, r.code);
                prop_assert!((200..600).contains(&r.code));
            }
            Event::Close => closed = true,
            _ => {}
        }
    }
    Ok(())
}

fn arb_chunk() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..40),
        prop::sample::select(vec![
            b"EHLO c\r\n".to_vec(),
            b"HELO c\r\n".to_vec(),
            b"MAIL FROM:<a@b>\r\n".to_vec(),
            b"RCPT TO:<x@b>\r\n".to_vec(),
            b"DATA\r\n".to_vec(),
            b"BDAT 3\r\n".to_vec(),
            b"BDAT 2 LAST\r\n".to_vec(),
            b"\r\n.\r\n".to_vec(),
            b"\n.\n".to_vec(),
            b"RSET\r\n".to_vec(),
            b"QUIT\r\n".to_vec(),
        ]),
    ]
}

proptest! {
    #[test]
    fn any_input_keeps_invariants(
        chunks in prop::collection::vec(arb_chunk(), 0..30),
        verdicts in prop::collection::vec(0u8..5, 1..8),
        normalize in any::<bool>(),
        line_limit in any::<bool>(),
    ) {
        let cfg = ServerConfig {
            max_command_line: 64,
            max_text_line: if line_limit { 32 } else { 0 },
            max_message_size: 100,
            max_recipients: 3,
            max_errors: 10,
            bare_lf: if normalize { BareLfPolicy::Normalize } else { BareLfPolicy::Reject },
            ..config()
        };
        let mut i = 0;
        let mut s = Session::new(cfg);
        let mut decide = |_: &Query| {
            i += 1;
            match verdicts[i % verdicts.len()] {
                0 | 1 => Decision::Accept,
                2 => Decision::Reject(Reply::new(450, Some(EnhancedCode(4, 0, 0)), "later")),
                3 => Decision::Queued { queue_id: "q".into() },
                _ => Decision::Disconnect(Reply::new(421, Some(EnhancedCode(4, 0, 0)), "bye")),
            }
        };
        let mut log = Vec::new();
        drain(&mut s, &mut decide, &mut log);
        for c in &chunks {
            s.receive(c);
            drain(&mut s, &mut decide, &mut log);
            // Waiting for input (never for a decision we already gave).
            prop_assert!(s.is_closed() || s.wants_input());
            prop_assert!(s.input.len() <= 64 + 40 || !matches!(s.mode, Mode::Command));
            // Content is never held back, whatever its line lengths.
            prop_assert!(s.input.is_empty() || !matches!(s.mode, Mode::Data));
        }
        check_invariants(&log)?;
        s.eof();
        drain(&mut s, &mut decide, &mut log);
        prop_assert_eq!(log.last(), Some(&Event::Close));
        check_invariants(&log)?;
    }
}
