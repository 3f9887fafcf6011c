//! Broken and hostile servers: garbage, over-long or endless replies,
//! replies out of sequence, unsolicited data, closes and timeouts. Plus the
//! property that any server bytes give every recipient exactly one outcome.

use super::tests::*;
use super::*;
use proptest::prelude::*;

const MSG: &str = "Subject: t\r\n\r\nbody\r\n";

/// A client in the middle of a pipelined transaction of three recipients.
fn mid_transaction() -> Harness {
    let mut h = ready_with(config(), EHLO_PIPE);
    h.send(message(
        "a@b.test",
        &["x@d.test", "y@d.test", "z@d.test"],
        MSG,
    ));
    h.written();
    h
}

fn assert_all_temporary(h: &Harness, text: &str) {
    let o = &h.outcomes()[0];
    assert_eq!(statuses(o), vec![Status::Temporary; 3]);
    for r in &o.recipients {
        assert!(r.local);
        assert!(r.reply.to_string().contains(text), "{}", r.reply);
    }
    let f = h.failure().unwrap();
    assert!(f.local && f.reply.to_string().contains(text));
    assert!(h.closed());
}

#[test]
fn garbage_reply() {
    let mut h = mid_transaction();
    h.server("hello there\r\n");
    assert_all_temporary(&h, "malformed reply from server");
    assert_eq!(
        h.outcomes()[0].recipients[0].reply.to_string(),
        "451 4.5.0 malformed reply from server: not an SMTP reply"
    );
    // Garbage is refused without waiting for its end of line.
    let mut h = mid_transaction();
    h.server("HTTP/1.1 400 Bad");
    assert_all_temporary(&h, "malformed reply");
}

#[test]
fn over_long_reply_line() {
    let mut h = mid_transaction();
    h.server("250 ");
    h.server(&"x".repeat(crate::reply::MAX_REPLY_LINE));
    assert_all_temporary(&h, "reply line too long");
}

#[test]
fn endless_multi_line_reply() {
    let mut h = mid_transaction();
    for _ in 0..MAX_REPLY_LINES {
        h.server("250-more\r\n");
    }
    assert!(h.outcomes().is_empty());
    h.server("250-more\r\n");
    assert_all_temporary(&h, "too many reply lines");
}

#[test]
fn reply_of_the_wrong_kind() {
    let mut h = mid_transaction();
    h.server("354 go ahead\r\n");
    assert_all_temporary(&h, "out of sequence");
}

#[test]
fn unsolicited_reply_while_idle() {
    let mut h = ready_with(config(), EHLO_PIPE);
    h.server("250 surprise\r\n");
    assert!(
        h.failure()
            .unwrap()
            .reply
            .to_string()
            .contains("out of sequence")
    );
    assert!(h.closed());
    // A 421 at any time is the server closing.
    let mut h = ready_with(config(), EHLO_PIPE);
    h.server("421 4.4.2 idle too long\r\n");
    let f = h.failure().unwrap();
    assert!(!f.local && f.reply.code == 421);
    assert!(h.closed() && h.written().is_empty());
}

#[test]
fn reply_during_data_content_is_out_of_sequence() {
    let mut h = ready_with(config(), EHLO_PIPE);
    h.send(message("a@b.test", &["x@d.test"], MSG));
    // The driver reads the 354 and an early final reply in one go, before
    // it took the content events.
    h.c.receive(b"250 ok\r\n250 ok\r\n");
    h.drain();
    h.c.receive(b"354 go\r\n554 no\r\n");
    h.drain();
    assert!(
        h.failure()
            .unwrap()
            .reply
            .to_string()
            .contains("out of sequence")
    );
}

#[test]
fn reply_421_mid_transaction() {
    let mut h = mid_transaction();
    h.server("250 ok\r\n250 ok\r\n421 4.3.2 shutting down\r\n");
    let o = &h.outcomes()[0];
    assert_eq!(statuses(o), vec![Status::Temporary; 3]);
    assert_eq!(o.recipients[2].reply.code, 421);
    assert!(!o.recipients[2].local);
    assert!(h.closed());
}

#[test]
fn close_mid_data() {
    let mut h = ready_with(config(), EHLO_PIPE);
    h.send(message("a@b.test", &["x@d.test", "y@d.test"], MSG));
    h.server("250 ok\r\n250 ok\r\n550 no\r\n354 go\r\n");
    h.c.eof();
    h.drain();
    let o = &h.outcomes()[0];
    assert_eq!(statuses(o), vec![Status::Temporary, Status::Permanent]);
    assert_eq!(
        o.recipients[0].reply.to_string(),
        "451 4.4.2 connection lost"
    );
    assert!(h.closed());
    // Nothing more after Close.
    let n = h.events.len();
    h.server("250 ok\r\n");
    h.c.eof();
    h.c.timeout();
    h.drain();
    assert_eq!(h.events.len(), n);
}

#[test]
fn timeout_names_the_stage() {
    let mut h = ready_with(config(), EHLO_PIPE);
    h.send(message("a@b.test", &["x@d.test"], MSG));
    h.server("250 ok\r\n250 ok\r\n354 go\r\n");
    assert_eq!(h.c.stage(), Some(Stage::DataEnd));
    h.c.timeout();
    h.drain();
    let r = &h.outcomes()[0].recipients[0];
    assert_eq!(
        r.reply.to_string(),
        "451 4.4.2 timeout waiting for the end of data reply"
    );
}

#[test]
fn server_text_is_sanitised() {
    let mut h = mid_transaction();
    let evil = format!(
        "550-5.1.1 \u{1b}[31mred\u{7f}\r\n550 5.1.1 {}\r\n",
        "y".repeat(2000)
    );
    h.server(&format!(
        "250 ok\r\n{evil}250 ok\r\n250 ok\r\n354 go\r\n250 ok\r\n"
    ));
    let r = &h.outcomes()[0].recipients[0];
    assert_eq!(r.reply.lines[0], "?[31mred?");
    let text: usize = r.reply.lines.iter().map(String::len).sum();
    assert!(text <= MAX_OUTCOME_TEXT);
}

#[test]
fn eof_while_idle_and_after_quit() {
    let mut h = ready_with(config(), EHLO_PIPE);
    h.c.eof();
    h.drain();
    assert!(
        h.failure()
            .unwrap()
            .reply
            .to_string()
            .contains("connection lost")
    );
    assert!(h.outcomes().is_empty());
    let mut h = ready_with(config(), EHLO_PIPE);
    h.c.quit();
    h.drain();
    h.server("garbage\r\n");
    assert!(h.closed() && h.failure().is_none());
}

/// Runs a client through `input` (split at the given points), with one
/// message of `n` recipients handed in at the start and a second one
/// whenever it becomes ready, then eof. Returns the outcomes; panics on any
/// broken invariant.
fn run_any(flags: u8, input: &[u8], splits: &[usize], n: usize) -> Vec<MessageOutcome> {
    let cfg = ClientConfig {
        protocol: if flags & 1 != 0 {
            Protocol::Lmtp
        } else {
            Protocol::Smtp
        },
        tls: match flags >> 1 & 3 {
            0 => TlsPolicy::None,
            1 => TlsPolicy::Opportunistic,
            _ => TlsPolicy::Require,
        },
        max_recipients: usize::from(flags >> 3 & 3),
        chunk_size: 1 + usize::from(flags >> 5) * 7,
        credentials: (flags & 0x80 != 0).then(|| Credentials {
            username: "u".into(),
            password: "p".into(),
        }),
        auth_without_tls: true,
        ..config()
    };
    let mut c = Client::new(cfg);
    let recipients: Vec<&str> = ["a@x.test", "b@x.test", "c@x.test", "d@x.test"][..n].to_vec();
    let mut sent = 0usize;
    let mut outcomes = Vec::new();
    let mut closed = false;
    let mut pump = |c: &mut Client, sent: &mut usize, outcomes: &mut Vec<MessageOutcome>| {
        while let Some(e) = c.next_event() {
            assert!(!closed, "event after Close: {e:?}");
            match e {
                Event::Outcome(o) => {
                    assert_eq!(o.recipients.len(), n);
                    for r in &o.recipients {
                        assert!((200..600).contains(&r.reply.code));
                        assert_eq!(sanitize(&r.reply), r.reply);
                    }
                    outcomes.push(o);
                }
                Event::Ready if *sent < 2 => {
                    // A Close may already be queued behind the Ready.
                    let taken = c.send(message("s@x.test", &recipients, MSG)).is_ok();
                    *sent += usize::from(taken);
                }
                Event::StartTls => c.tls_established(),
                Event::Close => closed = true,
                Event::Write(w) => {
                    // No bare LF may ever leave (commands or content).
                    for (i, &b) in w.iter().enumerate() {
                        if b == b'\n' {
                            assert!(i > 0 && w[i - 1] == b'\r');
                        }
                    }
                }
                _ => {}
            }
        }
    };
    c.send(message("s@x.test", &recipients, MSG)).unwrap();
    sent += 1;
    let mut pos = 0;
    for &s in splits {
        let end = (pos + s).min(input.len());
        c.receive(&input[pos..end]);
        pump(&mut c, &mut sent, &mut outcomes);
        pos = end;
    }
    c.receive(&input[pos..]);
    pump(&mut c, &mut sent, &mut outcomes);
    c.eof();
    pump(&mut c, &mut sent, &mut outcomes);
    assert!(c.is_closed());
    assert_eq!(outcomes.len(), sent, "one outcome per message handed in");
    outcomes
}

/// Server lines a fuzzer-like generator picks from, so runs get deep.
fn arb_server() -> impl Strategy<Value = Vec<u8>> {
    let line = prop_oneof![
        Just(&b"220 hi\r\n"[..]),
        Just(&b"250 ok\r\n"[..]),
        Just(&b"250-mx\r\n250-PIPELINING\r\n250-CHUNKING\r\n250-STARTTLS\r\n250 AUTH PLAIN LOGIN\r\n"[..]),
        Just(&b"250-mx\r\n250-PIPELINING\r\n250 SIZE 10\r\n"[..]),
        Just(&b"354 go\r\n"[..]),
        Just(&b"334 x\r\n"[..]),
        Just(&b"235 ok\r\n"[..]),
        Just(&b"452 4.5.3 too many recipients\r\n"[..]),
        Just(&b"450 later\r\n"[..]),
        Just(&b"550 no\r\n"[..]),
        Just(&b"421 bye\r\n"[..]),
        Just(&b"500 what\r\n"[..]),
        Just(&b"\xff\x00garbage\n"[..]),
    ];
    let chunk = prop_oneof![
        8 => line.prop_map(<[u8]>::to_vec),
        1 => prop::collection::vec(any::<u8>(), 0..20),
    ];
    prop::collection::vec(chunk, 0..40).prop_map(|v| v.concat())
}

proptest! {
    #[test]
    fn any_server_gives_every_recipient_one_outcome(
        flags in any::<u8>(),
        input in arb_server(),
        splits in prop::collection::vec(0usize..40, 0..10),
        n in 1usize..=4,
    ) {
        run_any(flags, &input, &splits, n);
    }

    #[test]
    fn random_bytes_never_panic(
        flags in any::<u8>(),
        input in prop::collection::vec(any::<u8>(), 0..300),
        splits in prop::collection::vec(0usize..40, 0..5),
    ) {
        run_any(flags, &input, &splits, 2);
    }
}

#[test]
fn a_well_behaved_server_delivers_both_messages() {
    let server = "220 hi\r\n250-mx\r\n250 PIPELINING\r\n250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n250 ok\r\n250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n250 ok\r\n";
    // A real server answers only what was written: one line at a time.
    let splits: Vec<usize> = server.split_inclusive('\n').map(str::len).collect();
    let o = run_any(0, server.as_bytes(), &splits, 2);
    assert_eq!(statuses(&o[0]), vec![Status::Delivered; 2]);
    assert_eq!(statuses(&o[1]), vec![Status::Delivered; 2]);
}
