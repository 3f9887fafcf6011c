//! Transcript tests of whole dialogs against `Session`.

use super::*;
use crate::address::Mailbox;
use crate::command::Ret;

pub(super) fn config() -> ServerConfig {
    ServerConfig {
        hostname: "mx.test".into(),
        ..ServerConfig::default()
    }
}

/// Runs every event out of the session, answering queries with `decide`,
/// and appends them to `log`.
pub(super) fn drain(
    s: &mut Session,
    decide: &mut dyn FnMut(&Query) -> Decision,
    log: &mut Vec<Event>,
) {
    while let Some(e) = s.next_event() {
        let q = if let Event::Query(q) = &e {
            Some(q.clone())
        } else {
            None
        };
        log.push(e);
        if let Some(q) = q {
            s.decide(decide(&q));
        }
    }
}

pub(super) fn run_events_with(
    cfg: ServerConfig,
    input: &[&[u8]],
    mut decide: impl FnMut(&Query) -> Decision,
) -> Vec<Event> {
    let mut s = Session::new(cfg);
    let mut log = Vec::new();
    drain(&mut s, &mut decide, &mut log);
    for chunk in input {
        s.receive(chunk);
        drain(&mut s, &mut decide, &mut log);
    }
    log
}

pub(super) fn replies(events: &[Event]) -> String {
    let mut out = String::new();
    for e in events {
        if let Event::Reply(r) = e {
            out.push_str(&String::from_utf8_lossy(&r.to_bytes()));
        }
    }
    out
}

pub(super) fn run(input: &[&[u8]], decide: impl FnMut(&Query) -> Decision) -> String {
    replies(&run_events_with(config(), input, decide))
}

pub(super) fn accept(_: &Query) -> Decision {
    Decision::Accept
}

pub(super) fn queued(q: &Query) -> Decision {
    match q {
        Query::EndOfData => Decision::Queued {
            queue_id: "Q1".into(),
        },
        _ => Decision::Accept,
    }
}

pub(super) fn body(events: &[Event]) -> Vec<u8> {
    events
        .iter()
        .filter_map(|e| {
            if let Event::Body(b) = e {
                Some(b.clone())
            } else {
                None
            }
        })
        .flatten()
        .collect()
}

pub(super) fn count(events: &[Event], pred: impl Fn(&Event) -> bool) -> usize {
    events.iter().filter(|e| pred(e)).count()
}

const EHLO_REPLY: &str = "250-mx.test Hello c.test\r\n250-PIPELINING\r\n250-SIZE 26214400\r\n250-8BITMIME\r\n\
250-SMTPUTF8\r\n250-ENHANCEDSTATUSCODES\r\n250-CHUNKING\r\n250 DSN\r\n";

#[test]
fn full_dialog() {
    let out = run(
        &[
            b"EHLO c.test\r\n",
            b"MAIL FROM:<a@c.test> SIZE=100 BODY=8BITMIME\r\n",
            b"RCPT TO:<b@mx.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b+2Bx@mx.test\r\n",
            b"DATA\r\n",
            b"Subject: hi\r\n\r\n..dot\r\nbody\r\n.\r\n",
            b"QUIT\r\n",
        ],
        queued,
    );
    let expected = format!(
        "220 mx.test ESMTP Tern\r\n{EHLO_REPLY}250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n\
354 End data with <CR><LF>.<CR><LF>\r\n250 2.0.0 Ok: queued as Q1\r\n221 2.0.0 Bye\r\n"
    );
    assert_eq!(out, expected);
}

#[test]
fn queries_carry_the_parsed_envelope_and_body_is_unstuffed() {
    let ev = run_events_with(
        config(),
        &[
            b"EHLO c.test\r\nMAIL FROM:<a@c.test> RET=HDRS ENVID=x+2By\r\n",
            b"RCPT TO:<b@mx.test> ORCPT=rfc822;b+2Bx@mx.test\r\n",
            b"DATA\r\n",
            b"A: b\r\n\r\n..x\r\n.y\r\n\r\n.\r\n",
        ],
        accept,
    );
    let qs: Vec<&Query> = ev
        .iter()
        .filter_map(|e| {
            if let Event::Query(q) = e {
                Some(q)
            } else {
                None
            }
        })
        .collect();
    assert_eq!(
        qs[1],
        &Query::Helo {
            domain: "c.test".into(),
            extended: true
        }
    );
    let Query::Mail { from, params } = qs[2] else {
        panic!("{qs:?}")
    };
    assert_eq!(from.to_string(), "<a@c.test>");
    assert_eq!(params.ret, Some(Ret::Hdrs));
    assert_eq!(params.envid.as_deref(), Some("x+y"));
    let Query::Rcpt { to, params } = qs[3] else {
        panic!()
    };
    assert_eq!(to.to_string(), "<b@mx.test>");
    assert_eq!(
        params.orcpt.as_ref().map(|o| o.address.as_str()),
        Some("b+x@mx.test")
    );
    assert_eq!(qs[4], &Query::Data);
    assert_eq!(qs[5], &Query::EndOfData);
    assert_eq!(body(&ev), b"A: b\r\n\r\n.x\r\ny\r\n\r\n");
}

#[test]
fn empty_message_and_transaction_state() {
    let mut s = Session::new(config());
    let mut log = Vec::new();
    let mut d = accept;
    drain(&mut s, &mut d, &mut log);
    s.receive(b"HELO c.test\r\nMAIL FROM:<>\r\nRCPT TO:<postmaster>\r\n");
    drain(&mut s, &mut d, &mut log);
    assert_eq!(s.helo_domain(), Some("c.test"));
    assert!(!s.used_esmtp());
    let tx = s.transaction().unwrap();
    assert_eq!(tx.from, ReversePath::Null);
    assert_eq!(
        tx.rcpts,
        vec![(ForwardPath::Postmaster, RcptParams::default())]
    );
    s.receive(b"DATA\r\n");
    drain(&mut s, &mut d, &mut log);
    assert_eq!(s.phase(), Phase::Data);
    s.receive(b".\r\n");
    drain(&mut s, &mut d, &mut log);
    assert_eq!(s.phase(), Phase::Command);
    assert!(s.transaction().is_none());
    assert_eq!(body(&log), b"");
    assert!(replies(&log).ends_with("354 End data with <CR><LF>.<CR><LF>\r\n250 2.0.0 Ok\r\n"));
    assert!(replies(&log).contains("250 mx.test\r\n"));
}

#[test]
fn early_talker_is_refused() {
    let mut s = Session::new(config());
    s.receive(b"EHLO x\r\n");
    assert_eq!(s.next_event(), Some(Event::Query(Query::Connect)));
    s.decide(Decision::Accept);
    let Some(Event::Reply(r)) = s.next_event() else {
        panic!()
    };
    assert_eq!(
        r.to_string(),
        "554 5.5.1 mx.test Error: input before greeting"
    );
    assert_eq!(s.next_event(), Some(Event::Close));
    assert_eq!(s.next_event(), None);
    assert!(s.is_closed());
}

#[test]
fn connect_reject_closes() {
    let out = run_events_with(config(), &[b"EHLO x\r\n"], |q| match q {
        Query::Connect => Decision::Reject(Reply::new(554, None, "go away")),
        _ => Decision::Accept,
    });
    assert_eq!(replies(&out), "554 go away\r\n");
    assert_eq!(out.last(), Some(&Event::Close));
}

#[test]
fn sequencing_errors() {
    let out = run(
        &[
            b"MAIL FROM:<a@b>\r\n",
            b"RCPT TO:<a@b>\r\n",
            b"DATA\r\n",
            b"EHLO c.test\r\n",
            b"RCPT TO:<a@b>\r\n",
            b"MAIL FROM:<a@b>\r\n",
            b"MAIL FROM:<a@b>\r\n",
            b"DATA\r\n",
            b"RSET\r\n",
            b"NOOP hello\r\n",
            b"VRFY root\r\n",
            b"HELP\r\n",
        ],
        accept,
    );
    let lines: Vec<&str> = out.lines().filter(|l| !l.starts_with("250-")).collect();
    assert_eq!(
        lines,
        vec![
            "220 mx.test ESMTP Tern",
            "503 5.5.1 Error: send HELO/EHLO first",
            "503 5.5.1 Error: need MAIL command",
            "503 5.5.1 Error: need MAIL command",
            "250 DSN",
            "503 5.5.1 Error: need MAIL command",
            "250 2.1.0 Ok",
            "503 5.5.1 Error: nested MAIL command",
            "554 5.5.1 Error: no valid recipients",
            "250 2.0.0 Ok",
            "250 2.0.0 Ok",
            "252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery",
            "214 2.0.0 Commands: HELO EHLO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP",
        ]
    );
}

#[test]
fn rejected_rcpt_is_not_added_and_ehlo_resets() {
    let mut s = Session::new(config());
    let mut log = Vec::new();
    let mut d = |q: &Query| match q {
        Query::Rcpt {
            to: ForwardPath::Mailbox(m),
            ..
        } if m.local_part == "bad" => {
            Decision::Reject(Reply::new(550, Some(EnhancedCode(5, 1, 1)), "no such user"))
        }
        _ => Decision::Accept,
    };
    drain(&mut s, &mut d, &mut log);
    s.receive(b"EHLO c.test\r\nMAIL FROM:<a@b>\r\nRCPT TO:<bad@b>\r\nRCPT TO:<good@b>\r\n");
    drain(&mut s, &mut d, &mut log);
    let tx = s.transaction().unwrap();
    assert_eq!(tx.rcpts.len(), 1);
    assert!(replies(&log).contains("550 5.1.1 no such user\r\n"));
    s.receive(b"EHLO again.test\r\n");
    drain(&mut s, &mut d, &mut log);
    assert!(s.transaction().is_none());
    assert_eq!(s.helo_domain(), Some("again.test"));
}

#[test]
fn too_many_recipients() {
    let cfg = ServerConfig {
        max_recipients: 2,
        ..config()
    };
    let ev = run_events_with(
        cfg,
        &[b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<1@b>\r\nRCPT TO:<2@b>\r\nRCPT TO:<3@b>\r\n"],
        accept,
    );
    assert!(
        replies(&ev)
            .ends_with("250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n452 4.5.3 Error: too many recipients\r\n")
    );
    assert_eq!(
        count(&ev, |e| matches!(e, Event::Query(Query::Rcpt { .. }))),
        2
    );
}

#[test]
fn long_command_line_gives_exactly_one_error() {
    let long = vec![b'A'; 10_000];
    let out = run(&[b"NOOP ", &long, &long, b"\r", b"\nNOOP\r\n"], accept);
    assert_eq!(
        out,
        "220 mx.test ESMTP Tern\r\n500 5.5.2 Error: line too long\r\n250 2.0.0 Ok\r\n"
    );
    // Exactly at the limit (4096 incl. CRLF) is fine; one more is not.
    let ok = format!("NOOP {}\r\n", "x".repeat(4096 - 7));
    let bad = format!("NOOP {}\r\n", "x".repeat(4096 - 6));
    let out = run(&[ok.as_bytes(), bad.as_bytes(), b"NOOP\r\n"], accept);
    assert_eq!(
        out,
        "220 mx.test ESMTP Tern\r\n250 2.0.0 Ok\r\n500 5.5.2 Error: line too long\r\n250 2.0.0 Ok\r\n"
    );
}

#[test]
fn long_line_does_not_stay_buffered() {
    let mut s = Session::new(config());
    let mut log = Vec::new();
    drain(&mut s, &mut accept, &mut log);
    for _ in 0..100 {
        s.receive(&[b'x'; 10_000]);
        drain(&mut s, &mut accept, &mut log);
        assert!(s.input.capacity() <= 64 * 1024);
    }
    assert_eq!(count(&log, |e| matches!(e, Event::Reply(_))), 2);
}

#[test]
fn bare_lf_and_cr_never_end_a_valid_command() {
    let out = run(
        &[
            b"EHLO c\r\n",
            // The LF-ended NOOP is refused at once (no wait for a CRLF), and
            // so is the rest of its line: the MAIL after the LF never runs.
            b"NOOP\nMAIL FROM:<a@b>\r\n",
            b"RSET\n\n",
            b"\r\n",
            b"NOOP\rRSET\r\n",
            b"NO\0OP\r\n",
            b"MAIL FROM:<a@b>\r\n",
        ],
        accept,
    );
    let lf = "500 5.5.2 Error: bare <LF> in command\r\n";
    assert!(
        out.ends_with(&format!(
            "250 DSN\r\n{lf}{lf}{lf}{lf}{lf}501 5.5.2 Error: bare <CR> in command\r\n\
501 5.5.2 Error: NUL in command\r\n250 2.1.0 Ok\r\n"
        )),
        "{out}"
    );
}

#[test]
fn nothing_after_a_bare_lf_runs_until_the_next_crlf() {
    let ev = run_events_with(
        config(),
        &[b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@b>\nRCPT TO:<evil@b>\r\nRCPT TO:<y@b>\r\n"],
        accept,
    );
    let asked: Vec<String> = ev
        .iter()
        .filter_map(|e| match e {
            Event::Query(Query::Rcpt { to, .. }) => Some(format!("{to:?}")),
            _ => None,
        })
        .collect();
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert!(
        asked[0].contains('y') && !asked[0].contains("evil"),
        "{asked:?}"
    );
}

#[test]
fn unknown_unimplemented_and_http() {
    let out = run(
        &[b"FOO\r\nAUTH PLAIN x\r\nSTARTTLS\r\nEXPN list\r\n"],
        accept,
    );
    assert_eq!(
        out,
        "220 mx.test ESMTP Tern\r\n500 5.5.2 Error: command not recognized\r\n502 5.5.1 Error: AUTH not implemented\r\n\
502 5.5.1 Error: STARTTLS not implemented\r\n502 5.5.1 Error: EXPN not implemented\r\n"
    );
    let ev = run_events_with(config(), &[b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"], accept);
    assert_eq!(
        replies(&ev),
        "220 mx.test ESMTP Tern\r\n554 5.5.1 Error: this is an SMTP server\r\n"
    );
    assert_eq!(ev.last(), Some(&Event::Close));
}

#[test]
fn too_many_errors_close() {
    let cfg = ServerConfig {
        max_errors: 3,
        ..config()
    };
    let ev = run_events_with(cfg, &[b"X\r\nX\r\nX\r\nX\r\nNOOP\r\n"], accept);
    assert_eq!(
        replies(&ev),
        "220 mx.test ESMTP Tern\r\n500 5.5.2 Error: command not recognized\r\n500 5.5.2 Error: command not recognized\r\n\
500 5.5.2 Error: command not recognized\r\n421 4.7.0 mx.test Error: too many errors\r\n"
    );
    assert_eq!(ev.last(), Some(&Event::Close));
    // Policy rejections count too.
    let cfg = ServerConfig {
        max_errors: 2,
        ..config()
    };
    let ev = run_events_with(
        cfg,
        &[b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@b>\r\nRCPT TO:<y@b>\r\n"],
        |q| match q {
            Query::Rcpt { .. } => {
                Decision::Reject(Reply::new(550, Some(EnhancedCode(5, 1, 1)), "no"))
            }
            _ => Decision::Accept,
        },
    );
    assert!(
        replies(&ev).ends_with(
            "550 5.1.1 no\r\n550 5.1.1 no\r\n421 4.7.0 mx.test Error: too many errors\r\n"
        )
    );
}

#[test]
fn esmtp_parameter_errors() {
    let cfg = ServerConfig {
        max_message_size: 1000,
        ..config()
    };
    let ev = run_events_with(
        cfg,
        &[
            b"HELO c\r\nMAIL FROM:<a@b> SIZE=10\r\nEHLO c\r\n",
            b"MAIL FROM:<a@b> FOO=bar\r\n",
            b"MAIL FROM:<a@b> BODY=BINARYMIME\r\n",
            b"MAIL FROM:<a@b> SIZE=1001\r\n",
            b"MAIL FROM:<a@b> SIZE=1 SIZE=2\r\n",
            b"MAIL FROM:<a@b> SIZE=1000 BODY=7BIT\r\n",
            b"RCPT TO:<x@b> NOTIFY=NEVER,DELAY\r\n",
            b"RCPT TO:<x@b> ORCPT=rfc822;bad+zz\r\n",
            b"RCPT TO:<x@b> FOO\r\n",
        ],
        accept,
    );
    let errs: Vec<String> = replies(&ev)
        .lines()
        .filter(|l| l.starts_with('5'))
        .map(|l| l[..9].to_string())
        .collect();
    assert_eq!(
        errs,
        vec![
            "555 5.5.4",
            "555 5.5.4",
            "555 5.5.4",
            "552 5.3.4",
            "501 5.5.4",
            "501 5.5.4",
            "501 5.5.4",
            "555 5.5.4"
        ]
    );
    // The declared size alone refused a message, before its content.
    assert_eq!(
        count(&ev, |e| *e == Event::MessageRefused(ContentError::TooLarge)),
        1
    );
}

#[test]
fn smtputf8_is_required_for_utf8_addresses() {
    let out = run(
        &[
            "EHLO c\r\nMAIL FROM:<δ@b.test>\r\nMAIL FROM:<a@b>\r\nRCPT TO:<用户@例子.test>\r\nRSET\r\n".as_bytes(),
            "MAIL FROM:<δ@b.test> SMTPUTF8\r\nRCPT TO:<用户@例子.test>\r\n".as_bytes(),
        ],
        accept,
    );
    assert!(out.ends_with(
        "553 5.6.7 Error: UTF-8 address needs SMTPUTF8\r\n250 2.1.0 Ok\r\n553 5.6.7 Error: UTF-8 address needs SMTPUTF8\r\n\
250 2.0.0 Ok\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"
    ));
}

#[test]
fn utf8_orcpt_needs_smtputf8_and_the_utf8_type() {
    let out = run(
        &[
            "EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@b> ORCPT=rfc822;jörg@x.test\r\n".as_bytes(),
            "RCPT TO:<x@b> ORCPT=utf-8;jörg@x.test\r\nRCPT TO:<x@b> ORCPT=rfc822;j+C3+B6rg@x.test\r\n"
                .as_bytes(),
            "RSET\r\nMAIL FROM:<a@b> SMTPUTF8\r\nRCPT TO:<x@b> ORCPT=utf-8;jörg@x.test\r\n".as_bytes(),
            "RCPT TO:<y@b> ORCPT=rfc822;jörg@x.test\r\n".as_bytes(),
            "RSET\r\nMAIL FROM:<a@b>\r\nRCPT TO:<z@b> ORCPT=utf-8;j\\x{F6}rg@x.test\r\n".as_bytes(),
        ],
        accept,
    );
    let codes: Vec<&str> = out.lines().skip(9).map(|l| &l[..9]).collect();
    assert_eq!(
        codes,
        vec![
            "250 2.1.0", // MAIL
            "501 5.5.4", // raw UTF-8 is not xtext (RFC 3461 §4)
            "501 5.5.4", // unitext only with SMTPUTF8 (RFC 6533 §3)
            "501 5.5.4", // xtext-encoded UTF-8 likewise
            "250 2.0.0", // RSET
            "250 2.1.0",
            "250 2.1.5",
            "501 5.5.4", // rfc822 stays xtext even under SMTPUTF8
            "250 2.0.0", // RSET
            "250 2.1.0",
            "250 2.1.5", // utf-8-addr-xtext needs no SMTPUTF8
        ],
        "{out}"
    );
}

#[test]
fn bad_addresses() {
    let long = format!("RCPT TO:<{}@b>\r\n", "a".repeat(65));
    let out = run(
        &[
            b"EHLO c\r\nMAIL FROM:a@b\r\nMAIL FROM:<a@@b>\r\nMAIL FROM:<a@b>\r\n",
            long.as_bytes(),
            b"RCPT TO:<a b@c>\r\n",
        ],
        accept,
    );
    let codes: Vec<&str> = out
        .lines()
        .map(|l| &l[..9.min(l.len())])
        .filter(|l| l.starts_with('5'))
        .collect();
    assert_eq!(
        codes,
        vec!["501 5.5.4", "501 5.1.7", "501 5.1.3", "501 5.1.3"]
    );
}

#[test]
fn pipelined_group_is_answered_in_order() {
    let out = run(
        &[
            b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@b>\r\nRCPT TO:<y@b>\r\nDATA\r\n",
            b"hi\r\n.\r\nQUIT\r\n",
        ],
        accept,
    );
    assert!(out.ends_with(
        "250 DSN\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n\
250 2.0.0 Ok\r\n221 2.0.0 Bye\r\n"
    ));
}

#[test]
fn content_sent_with_data_is_a_pipelining_violation() {
    let ev = run_events_with(
        config(),
        &[
            b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@b>\r\nDATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n",
            b"NOOP\r\n",
        ],
        accept,
    );
    // The session closes: the NOOP of the second read is never answered.
    assert!(
        replies(&ev).ends_with(
            "250 2.1.5 Ok\r\n554 5.5.0 Error: improper use of SMTP command pipelining\r\n"
        )
    );
    assert_eq!(ev.last(), Some(&Event::Close));
    assert_eq!(count(&ev, |e| matches!(e, Event::Query(Query::Data))), 0);
    assert_eq!(count(&ev, |e| matches!(e, Event::Body(_))), 0);
}

#[test]
fn content_arriving_while_data_query_is_open_is_a_violation() {
    let mut s = Session::new(config());
    let mut log = Vec::new();
    drain(&mut s, &mut accept, &mut log);
    s.receive(b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@b>\r\nDATA\r\n");
    let mut pending_data = false;
    while let Some(e) = s.next_event() {
        if e == Event::Query(Query::Data) {
            pending_data = true;
            break;
        }
        if let Event::Query(_) = e {
            s.decide(Decision::Accept);
        }
    }
    assert!(pending_data);
    assert!(!s.wants_input());
    s.receive(b"early body\r\n.\r\n");
    s.decide(Decision::Accept);
    let Some(Event::Reply(r)) = s.next_event() else {
        panic!()
    };
    assert_eq!(r.code, 554);
    assert!(s.transaction().is_none());
}

#[test]
fn data_limits() {
    let cfg = ServerConfig {
        max_message_size: 10,
        ..config()
    };
    let head: &[u8] = b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@b>\r\nDATA\r\n";
    let ev = run_events_with(
        cfg.clone(),
        &[head, b"0123456789abcdef\r\n", b"more\r\n.\r\n", b"NOOP\r\n"],
        accept,
    );
    assert!(replies(&ev).ends_with("552 5.3.4 Error: message too large\r\n250 2.0.0 Ok\r\n"));
    assert_eq!(
        count(&ev, |e| *e
            == Event::MessageAborted(Some(ContentError::TooLarge))),
        1
    );
    assert_eq!(count(&ev, |e| *e == Event::Query(Query::EndOfData)), 0);
    assert!(body(&ev).len() <= 10);

    // No line limit by default: a long line is content like any other.
    let long = vec![b'x'; 2000];
    let ev = run_events_with(config(), &[head, &long, b"\r\n.\r\n"], accept);
    assert!(replies(&ev).ends_with("354 End data with <CR><LF>.<CR><LF>\r\n250 2.0.0 Ok\r\n"));
    assert_eq!(body(&ev), [&long[..], b"\r\n"].concat());
    // With one, the message is refused.
    let cfg = ServerConfig {
        max_text_line: 1000,
        ..config()
    };
    let ev = run_events_with(cfg, &[head, &long, b"\r\n.\r\n"], accept);
    assert!(replies(&ev).ends_with("554 5.6.0 Error: message line too long\r\n"));
    assert_eq!(
        count(&ev, |e| *e
            == Event::MessageAborted(Some(ContentError::LineTooLong))),
        1
    );

    let cfg = ServerConfig {
        max_received_headers: 2,
        ..config()
    };
    let msg: &[u8] = b"Received: a\r\nreceived : b\r\nRECEIVED:c\r\n\r\nReceived: in body\r\n.\r\n";
    let ev = run_events_with(cfg.clone(), &[head, msg], accept);
    assert!(replies(&ev).ends_with("554 5.4.6 Error: too many hops\r\n"));
    let msg: &[u8] =
        b"Received: a\r\nX: y\r\nReceived: b\r\n\r\nReceived: c\r\nReceived: d\r\n.\r\n";
    let ev = run_events_with(cfg, &[head, msg], accept);
    assert!(replies(&ev).ends_with("250 2.0.0 Ok\r\n"));
}

#[test]
fn rejected_data_and_end_of_data_reset_the_transaction() {
    let ev = run_events_with(
        config(),
        &[
            b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@b>\r\nDATA\r\n",
            b"RCPT TO:<y@b>\r\n",
        ],
        |q| match q {
            Query::Data => {
                Decision::Reject(Reply::new(451, Some(EnhancedCode(4, 3, 0)), "try later"))
            }
            _ => Decision::Accept,
        },
    );
    assert!(
        replies(&ev).ends_with("451 4.3.0 try later\r\n503 5.5.1 Error: need MAIL command\r\n")
    );
    let ev = run_events_with(
        config(),
        &[
            b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@b>\r\nDATA\r\n",
            b"x\r\n.\r\n",
            b"RCPT TO:<y@b>\r\n",
        ],
        |q| match q {
            Query::EndOfData => {
                Decision::Reject(Reply::new(554, Some(EnhancedCode(5, 7, 1)), "spam"))
            }
            _ => Decision::Accept,
        },
    );
    assert!(replies(&ev).ends_with("554 5.7.1 spam\r\n503 5.5.1 Error: need MAIL command\r\n"));
    assert_eq!(count(&ev, |e| matches!(e, Event::MessageAborted(_))), 0);
}

#[test]
fn disconnect_decision_closes() {
    let ev = run_events_with(
        config(),
        &[b"EHLO c\r\nMAIL FROM:<a@b>\r\nNOOP\r\n"],
        |q| match q {
            Query::Mail { .. } => {
                Decision::Disconnect(Reply::new(421, Some(EnhancedCode(4, 7, 0)), "bye"))
            }
            _ => Decision::Accept,
        },
    );
    assert!(replies(&ev).ends_with("421 4.7.0 bye\r\n"));
    assert_eq!(ev.last(), Some(&Event::Close));
}

#[test]
fn timeout_shutdown_eof() {
    let mut s = Session::new(config());
    let mut log = Vec::new();
    drain(&mut s, &mut accept, &mut log);
    s.timeout();
    drain(&mut s, &mut accept, &mut log);
    assert!(replies(&log).ends_with("421 4.4.2 mx.test Error: timeout exceeded\r\n"));
    s.shutdown();
    s.receive(b"NOOP\r\n");
    assert_eq!(s.next_event(), None);

    let mut s = Session::new(config());
    let mut log = Vec::new();
    drain(&mut s, &mut accept, &mut log);
    s.shutdown();
    drain(&mut s, &mut accept, &mut log);
    assert!(replies(&log).ends_with("421 4.3.2 mx.test Service shutting down\r\n"));

    let mut s = Session::new(config());
    let mut log = Vec::new();
    drain(&mut s, &mut accept, &mut log);
    s.receive(b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@b>\r\nBDAT 3\r\nabc");
    drain(&mut s, &mut accept, &mut log);
    s.eof();
    let tail: Vec<Event> = std::iter::from_fn(|| s.next_event()).collect();
    assert_eq!(tail, vec![Event::MessageAborted(None), Event::Close]);
}

#[test]
fn mailbox_in_query_is_semantic() {
    let ev = run_events_with(
        config(),
        &[b"EHLO c\r\nMAIL FROM: <\"a b\"@c.test>\r\n"],
        accept,
    );
    let from = ev.iter().find_map(|e| match e {
        Event::Query(Query::Mail {
            from: ReversePath::Mailbox(m),
            ..
        }) => Some(m.clone()),
        _ => None,
    });
    assert_eq!(from, Some("\"a b\"@c.test".parse::<Mailbox>().unwrap()));
}

#[test]
fn idle_session_is_small() {
    let s = Session::new(config());
    assert!(
        std::mem::size_of_val(&s) < 1024,
        "{}",
        std::mem::size_of_val(&s)
    );
}

#[test]
fn refused_data_ends_the_transaction() {
    // RCPT refused, then DATA refused: a pipelined RCPT/DATA afterwards must
    // not revive the transaction (a new MAIL is needed).
    let ev = run_events_with(
        config(),
        &[
            b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@b>\r\nDATA\r\n",
            b"RCPT TO:<x@b>\r\nDATA\r\n",
        ],
        |q| match q {
            Query::Rcpt { .. } => {
                Decision::Reject(Reply::new(550, Some(EnhancedCode(5, 1, 1)), "no"))
            }
            _ => Decision::Accept,
        },
    );
    assert!(
        replies(&ev).ends_with(
            "250 2.1.0 Ok\r\n550 5.1.1 no\r\n554 5.5.1 Error: no valid recipients\r\n\
503 5.5.1 Error: need MAIL command\r\n503 5.5.1 Error: need MAIL command\r\n"
        ),
        "{}",
        replies(&ev)
    );
}

#[test]
fn bdat_after_helo_is_refused_and_its_octets_swallowed() {
    let ev = run_events_with(
        config(),
        &[b"HELO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@b>\r\nBDAT 4 LAST\r\nQUITNOOP\r\n"],
        accept,
    );
    assert!(
        replies(&ev).ends_with("503 5.5.1 Error: BDAT needs EHLO\r\n250 2.0.0 Ok\r\n"),
        "{}",
        replies(&ev)
    );
    assert_eq!(
        count(&ev, |e| matches!(e, Event::Query(Query::EndOfData))),
        0
    );
}

#[test]
fn content_after_a_refused_data_is_never_run_as_commands() {
    let ev = run_events_with(
        config(),
        &[b"EHLO c\r\nMAIL FROM:<a@b>\r\nDATA\r\nMAIL FROM:<evil@b>\r\nRCPT TO:<x@b>\r\n"],
        accept,
    );
    assert!(
        replies(&ev).ends_with(
            "250 2.1.0 Ok\r\n554 5.5.0 Error: improper use of SMTP command pipelining\r\n"
        ),
        "{}",
        replies(&ev)
    );
    assert_eq!(
        count(&ev, |e| matches!(e, Event::Query(Query::Mail { .. }))),
        1
    );
    assert_eq!(ev.last(), Some(&Event::Close));
}

#[test]
fn recipients_past_the_limit_are_not_errors() {
    // A pipelining client sends many RCPTs past the limit: each gets 452
    // 4.5.3, the session is not closed for "too many errors", DATA goes on.
    let mut cfg = config();
    cfg.max_recipients = 2;
    cfg.max_errors = 3;
    let mut input = b"EHLO c\r\nMAIL FROM:<a@b>\r\n".to_vec();
    for i in 0..10 {
        input.extend_from_slice(format!("RCPT TO:<r{i}@b>\r\n").as_bytes());
    }
    let ev = run_events_with(cfg, &[&input, b"DATA\r\n"], accept);
    let out = replies(&ev);
    assert_eq!(out.matches("452 4.5.3").count(), 8, "{out}");
    assert!(!out.contains("421"), "{out}");
    assert!(
        out.ends_with("354 End data with <CR><LF>.<CR><LF>\r\n"),
        "{out}"
    );
}

#[test]
fn an_over_long_tainted_line_ends_its_taint() {
    let cfg = ServerConfig {
        max_command_line: 512,
        ..config()
    };
    // The rest of the tainted line arrives without its CRLF and is too long:
    // it is skipped up to that CRLF, which also ends the taint.
    let long = "x".repeat(600);
    let input: [&[u8]; 4] = [b"EHLO c\r\n", b"NOOP\n", long.as_bytes(), b"\r\nNOOP\r\n"];
    let out = replies(&run_events_with(cfg, &input, accept));
    assert!(
        out.ends_with(
            "500 5.5.2 Error: bare <LF> in command\r\n500 5.5.2 Error: line too long\r\n250 2.0.0 Ok\r\n"
        ),
        "{out}"
    );
}

#[test]
fn errors_count_again_after_an_accepted_message() {
    let cfg = ServerConfig {
        max_errors: 3,
        ..config()
    };
    let rcpt_policy = |q: &Query| match q {
        Query::Rcpt { to, .. } if to.to_string().starts_with("<gone") => {
            Decision::Reject(Reply::new(550, Some(EnhancedCode(5, 1, 1)), "no"))
        }
        other => queued(other),
    };
    let tx =
        b"MAIL FROM:<a@b>\r\nRCPT TO:<gone1@b>\r\nRCPT TO:<gone2@b>\r\nRCPT TO:<x@b>\r\nDATA\r\n";
    let ev = run_events_with(
        cfg,
        &[
            b"EHLO c\r\n",
            tx,
            b"hi\r\n.\r\n",
            tx,
            b"hi\r\n.\r\n",
            b"NOOP\r\n",
        ],
        rcpt_policy,
    );
    let r = replies(&ev);
    assert_eq!(r.matches("250 2.0.0 Ok: queued as Q1").count(), 2, "{r}");
    assert!(!r.contains("too many errors"), "{r}");
    assert!(r.ends_with("250 2.0.0 Ok\r\n"), "{r}");
}

#[test]
fn a_bdat_line_refused_for_its_syntax_still_swallows_its_chunk() {
    // The 12 octets are the chunk, not two NOOPs.
    let ev = run_events_with(
        config(),
        &[b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@b>\r\nBDAT 12 FOO\r\nNOOP\r\nNOOP\r\nRCPT TO:<y@b>\r\n"],
        accept,
    );
    let r = replies(&ev);
    assert!(
        r.ends_with("250 2.1.5 Ok\r\n501 5.5.4 Syntax: BDAT size [LAST]\r\n503 5.5.1 Error: need MAIL command\r\n"),
        "{r}"
    );
    // Bytes that are not UTF-8 after a readable size: refused, chunk swallowed.
    let ev = run_events_with(
        config(),
        &[b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@b>\r\nBDAT 6 \xff\r\nQUIT\r\nNOOP\r\n"],
        accept,
    );
    let r = replies(&ev);
    assert!(
        r.ends_with("501 5.5.2 Error: invalid UTF-8 in command\r\n250 2.0.0 Ok\r\n"),
        "{r}"
    );
    // Extra spaces are tolerated, as in the other commands.
    let ev = run_events_with(
        config(),
        &[b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@b>\r\nBDAT 4  LAST\r\nabcd"],
        queued,
    );
    assert!(replies(&ev).ends_with("250 2.0.0 Ok: queued as Q1\r\n"));
    assert_eq!(body(&ev), b"abcd");
}

#[test]
fn a_bdat_line_that_cannot_be_delimited_ends_the_session() {
    // Over-long, or cut by a bare LF: what follows may be chunk data.
    let long = [b"BDAT 13 ".as_slice(), &[b'x'; 5000], b"\r\n"].concat();
    let long_unfinished = [b"BDAT 13 ".as_slice(), &[b'x'; 5000]].concat();
    for line in [
        &b"BDAT x12\r\n"[..],
        b"BDAT 12x\r\n",
        b"BDAT\r\n",
        b"BDAT 99999999999999999999999\r\n",
        b"BDAT 14\n",
        &long,
        &long_unfinished,
    ] {
        let mut input = b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@b>\r\n".to_vec();
        input.extend_from_slice(line);
        input.extend_from_slice(b"RSET\r\nNOOP\r\n");
        let ev = run_events_with(config(), &[&input], accept);
        let r = replies(&ev);
        assert!(
            r.ends_with("250 2.1.5 Ok\r\n501 5.5.4 Error: BDAT chunk cannot be delimited, closing connection\r\n"),
            "{r}"
        );
        assert_eq!(ev.last(), Some(&Event::Close));
    }
    // The over-long line arriving before any line end.
    let ev = run_events_with(
        config(),
        &[
            b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@b>\r\n",
            &long_unfinished,
            b"\r\nRSET\r\n",
        ],
        accept,
    );
    assert!(
        replies(&ev).ends_with("250 2.1.5 Ok\r\n501 5.5.4 Error: BDAT chunk cannot be delimited, closing connection\r\n"),
        "{}",
        replies(&ev)
    );
    assert_eq!(ev.last(), Some(&Event::Close));
}

#[test]
fn refused_recipients_are_never_forgiven() {
    // A prober slipping an accepted message to postmaster between probes:
    // the error count starts again, the refused-recipient count does not.
    let cfg = ServerConfig {
        max_errors: 3,
        max_rejected_recipients: 4,
        ..config()
    };
    let policy = |q: &Query| match q {
        Query::Rcpt { to, .. } if to.to_string().starts_with("<guess") => {
            Decision::Reject(Reply::new(550, Some(EnhancedCode(5, 1, 1)), "no"))
        }
        other => queued(other),
    };
    let round = b"MAIL FROM:<a@b>\r\nRCPT TO:<guess1@b>\r\nRCPT TO:<guess2@b>\r\nRCPT TO:<Postmaster>\r\nDATA\r\n";
    let ev = run_events_with(
        cfg,
        &[b"EHLO c\r\n", round, b"x\r\n.\r\n", round, b"x\r\n.\r\n"],
        policy,
    );
    let r = replies(&ev);
    assert_eq!(r.matches("250 2.0.0 Ok: queued as Q1").count(), 1, "{r}");
    assert!(
        r.ends_with("550 5.1.1 no\r\n550 5.1.1 no\r\n421 4.7.0 mx.test Error: too many rejected recipients\r\n"),
        "{r}"
    );
    assert_eq!(ev.last(), Some(&Event::Close));
}
