//! Transcript tests of hostile input: NUL in content, chunks over the size
//! limit, junk command floods, and first lines that are not SMTP.

use super::tests::{accept, body, config, count, queued, replies, run_events_with};
use super::*;

const HEAD: &[u8] = b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@b>\r\n";

fn with_nul(nul: NulPolicy) -> ServerConfig {
    ServerConfig { nul, ..config() }
}

#[test]
fn nul_in_data_is_refused_at_the_real_end_and_the_session_goes_on() {
    // `<CRLF>NUL.<CRLF>` is content: the MAIL after it is message text,
    // and the whole message is refused once its real end arrives.
    let ev = run_events_with(
        config(),
        &[
            HEAD,
            b"DATA\r\n",
            b"a\r\n\0.\r\nMAIL FROM:<x@y>\r\n.\r\nNOOP\r\n",
        ],
        queued,
    );
    assert!(
        replies(&ev).ends_with("354 End data with <CR><LF>.<CR><LF>\r\n550 5.6.0 Error: NUL octet in message\r\n250 2.0.0 Ok\r\n"),
        "{}",
        replies(&ev)
    );
    assert_eq!(count(&ev, |e| *e == Event::Query(Query::EndOfData)), 0);
    assert_eq!(
        count(&ev, |e| *e
            == Event::MessageAborted(Some(ContentError::Nul))),
        1
    );
    assert!(!body(&ev).contains(&0));
}

#[test]
fn nul_in_bdat_is_refused_after_its_chunk() {
    // RFC 3030 §2: a chunk's reply may refuse the transaction; the chunks
    // after it are swallowed and refused as having no transaction.
    let ev = run_events_with(
        config(),
        &[HEAD, b"BDAT 3\r\na\0b", b"BDAT 2 LAST\r\n\r\n", b"NOOP\r\n"],
        queued,
    );
    let r = replies(&ev);
    assert!(
        r.ends_with("550 5.6.0 Error: NUL octet in message\r\n503 5.5.1 Error: need MAIL command\r\n250 2.0.0 Ok\r\n"),
        "{r}"
    );
    assert_eq!(count(&ev, |e| *e == Event::Query(Query::EndOfData)), 0);
    // In the last chunk: refused after it.
    let ev = run_events_with(
        config(),
        &[HEAD, b"BDAT 4 LAST\r\na\r\n\0", b"NOOP\r\n"],
        queued,
    );
    assert!(replies(&ev).ends_with("550 5.6.0 Error: NUL octet in message\r\n250 2.0.0 Ok\r\n"));
}

#[test]
fn nul_is_stripped_when_configured() {
    let ev = run_events_with(
        with_nul(NulPolicy::Strip),
        &[HEAD, b"DATA\r\n", b"a\0b\r\n\0.\r\n.\r\n"],
        queued,
    );
    assert!(replies(&ev).ends_with("250 2.0.0 Ok: queued as Q1\r\n"));
    assert_eq!(body(&ev), b"ab\r\n.\r\n");
    let ev = run_events_with(
        with_nul(NulPolicy::Strip),
        &[HEAD, b"BDAT 5 LAST\r\na\0\0b\0"],
        queued,
    );
    assert!(replies(&ev).ends_with("250 2.0.0 Ok: queued as Q1\r\n"));
    assert_eq!(body(&ev), b"ab");
}

#[test]
fn a_bdat_chunk_over_the_size_limit_is_refused_at_once_and_closes() {
    let cfg = ServerConfig {
        max_message_size: 1000,
        ..config()
    };
    // Accepted transaction, refused transaction, and no transaction at all:
    // the answer comes before a single octet of the chunk is read.
    for (head, messages) in [
        (HEAD, 1),
        (b"EHLO c\r\nMAIL FROM:<a@b>\r\n", 1),
        (b"EHLO c\r\n", 0),
    ] {
        let ev = run_events_with(cfg.clone(), &[head, b"BDAT 4294967296 LAST\r\n"], queued);
        // A refused message when there was a transaction.
        assert_eq!(
            count(&ev, |e| *e == Event::MessageRefused(ContentError::TooLarge)),
            messages
        );
        let r = replies(&ev);
        assert!(
            r.ends_with(
                "552 5.3.4 Error: BDAT chunk exceeds the message size limit, closing connection\r\n"
            ),
            "{r}"
        );
        assert_eq!(ev.last(), Some(&Event::Close));
    }
    // Mid-message, the content streamed so far is dropped as too large.
    let ev = run_events_with(
        cfg.clone(),
        &[HEAD, b"BDAT 3\r\nabc", b"BDAT 4294967296 LAST\r\n"],
        queued,
    );
    assert_eq!(
        count(&ev, |e| *e
            == Event::MessageAborted(Some(ContentError::TooLarge))),
        1
    );
    // A BDAT line refused for its syntax but with a readable size, too.
    let ev = run_events_with(cfg.clone(), &[HEAD, b"BDAT 1001 FOO\r\n"], queued);
    assert!(replies(&ev).ends_with(
        "552 5.3.4 Error: BDAT chunk exceeds the message size limit, closing connection\r\n"
    ));
    // The limit itself still fits.
    let mut input = HEAD.to_vec();
    input.extend_from_slice(b"BDAT 1000 LAST\r\n");
    input.extend_from_slice(&[b'x'; 1000]);
    let ev = run_events_with(cfg, &[&input], queued);
    assert!(replies(&ev).ends_with("250 2.0.0 Ok: queued as Q1\r\n"));
}

#[test]
fn junk_commands_are_bounded_and_an_accepted_message_forgives_them() {
    let cfg = ServerConfig {
        max_junk_commands: 5,
        ..config()
    };
    let noops = |n| b"NOOP\r\n".repeat(n);
    let ev = run_events_with(cfg.clone(), &[b"EHLO c\r\n", &noops(8)], accept);
    let r = replies(&ev);
    assert_eq!(r.matches("250 2.0.0 Ok\r\n").count(), 5, "{r}");
    assert!(
        r.ends_with("250 2.0.0 Ok\r\n421 4.7.0 mx.test Error: too many commands without mail\r\n"),
        "{r}"
    );
    assert_eq!(ev.last(), Some(&Event::Close));

    // Every kind of command that makes no progress counts.
    let junk: &[u8] = b"RSET\r\nVRFY x\r\nHELP\r\nEHLO again\r\nXYZZY\r\nEXPN x\r\n";
    let ev = run_events_with(cfg.clone(), &[b"EHLO c\r\n", junk], accept);
    assert!(replies(&ev).ends_with("421 4.7.0 mx.test Error: too many commands without mail\r\n"));

    // A delivered message starts the count again.
    let mut input = b"EHLO c\r\n".to_vec();
    for _ in 0..3 {
        input.extend_from_slice(&noops(4));
        input.extend_from_slice(b"MAIL FROM:<a@b>\r\nRCPT TO:<x@b>\r\nBDAT 2 LAST\r\nhi");
    }
    let ev = run_events_with(cfg, &[&input], queued);
    let r = replies(&ev);
    assert_eq!(r.matches("queued as Q1").count(), 3, "{r}");
    assert!(!r.contains("421"), "{r}");
}

#[test]
fn a_binary_first_line_gets_one_reply_and_close() {
    // The start of a TLS ClientHello, an SSLv2 hello, and other binary.
    for first in [
        &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"[..],
        b"\x80\x2e\x01\x00\x02",
        b"\x00\x00\x00\x00",
        b"\xff\xfe\r\n",
    ] {
        let ev = run_events_with(config(), &[first], accept);
        assert_eq!(
            replies(&ev),
            "220 mx.test ESMTP Tern\r\n554 5.5.1 Error: this is an SMTP server\r\n",
            "{first:?}"
        );
        assert_eq!(ev.last(), Some(&Event::Close));
    }
    // An HTTP request line, HTTP/2's preface too.
    for first in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    ] {
        let ev = run_events_with(config(), &[first], accept);
        assert_eq!(
            replies(&ev),
            "220 mx.test ESMTP Tern\r\n554 5.5.1 Error: this is an SMTP server\r\n"
        );
    }
    // Binary later in a session is an ordinary bad command: 501, not a close.
    let ev = run_events_with(
        config(),
        &[b"EHLO c\r\n", b"\x16\x03\x01\r\nNOOP\r\n"],
        accept,
    );
    assert!(
        replies(&ev).ends_with("501 5.5.2 Error: control character in command\r\n250 2.0.0 Ok\r\n")
    );
    // Blank lines and spaces before the first command are not binary.
    let ev = run_events_with(config(), &[b"\r\n", b" NOOP\r\n", b"NOOP\r\n"], accept);
    assert!(replies(&ev).ends_with("250 2.0.0 Ok\r\n"));
}

#[test]
fn forbidden_octets_in_commands_get_501_and_the_session_goes_on() {
    let ev = run_events_with(
        config(),
        &[
            b"EHLO c\r\n",
            b"MAIL FROM:<a\0@b>\r\n",
            b"MAIL FROM:<a@b>\r\n",
            b"RCPT TO:<x\r@b>\r\n",
            b"RCPT TO:<x@b>>\r\n",
            b"RCPT TO:<x@b>\r\n",
        ],
        accept,
    );
    let r = replies(&ev);
    assert!(
        r.ends_with(
            "501 5.1.7 Error: NUL in sender address\r\n250 2.1.0 Ok\r\n\
501 5.1.3 Error: bare <CR> in recipient address\r\n\
501 5.1.3 Error: bad recipient address: bad address syntax: junk after the address\r\n\
250 2.1.5 Ok\r\n"
        ),
        "{r}"
    );
}

#[test]
fn a_bdat_with_a_blank_other_than_space_cannot_be_delimited() {
    // Its chunk must never run as commands: a reader splitting on any blank
    // sees `BDAT 30 LAST` here.
    for line in [&b"BDAT\t30 LAST\r\n"[..], b"BDAT\x0b30 LAST\r\n"] {
        let mut input = HEAD.to_vec();
        input.extend_from_slice(line);
        input.extend_from_slice(b"MAIL FROM:<x@y>\r\nRSET\r\nNOOP\r\n");
        let ev = run_events_with(config(), &[&input], queued);
        let r = replies(&ev);
        assert!(
            r.ends_with("250 2.1.5 Ok\r\n501 5.5.4 Error: BDAT chunk cannot be delimited, closing connection\r\n"),
            "{r}"
        );
        assert_eq!(ev.last(), Some(&Event::Close));
    }
    // BDATX is another verb: an ordinary unknown command.
    let ev = run_events_with(config(), &[b"EHLO c\r\nBDATX 3\r\nNOOP\r\n"], queued);
    assert!(replies(&ev).ends_with("500 5.5.2 Error: command not recognized\r\n250 2.0.0 Ok\r\n"));
}

#[test]
fn empty_chunks_and_rcpts_past_the_limit_count_as_junk() {
    let cfg = ServerConfig {
        max_junk_commands: 5,
        max_recipients: 1,
        ..config()
    };
    let ev = run_events_with(cfg.clone(), &[HEAD, &b"BDAT 0\r\n".repeat(8)], queued);
    let r = replies(&ev);
    assert_eq!(r.matches("250 2.0.0 0 octets received").count(), 5, "{r}");
    assert!(
        r.ends_with("421 4.7.0 mx.test Error: too many commands without mail\r\n"),
        "{r}"
    );
    let ev = run_events_with(cfg, &[HEAD, &b"RCPT TO:<y@b>\r\n".repeat(8)], queued);
    let r = replies(&ev);
    assert_eq!(r.matches("452 4.5.3").count(), 5, "{r}");
    assert!(
        r.ends_with("421 4.7.0 mx.test Error: too many commands without mail\r\n"),
        "{r}"
    );
}
