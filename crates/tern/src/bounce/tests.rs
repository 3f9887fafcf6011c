use super::*;
use crate::spool::{RcptStatus, Route};
use mail_parser::{MessageParser, MimeHeaders};
use proptest::prelude::*;

const ORIGINAL: &[u8] = b"From: Alice <alice@example.com>\r\n\
To: bob@example.net\r\n\
Subject: lunch\r\n\
Message-ID: <m1@example.com>\r\n\
\r\n\
See you at noon.\r\n";

fn rcpt(address: &str) -> Recipient {
    Recipient {
        address: address.to_string(),
        original: address.to_string(),
        orcpt: None,
        notify: None,
        route: Route::Remote,
        status: RcptStatus::Pending,
    }
}

fn envelope(sender: &str, rcpts: Vec<Recipient>) -> Envelope {
    Envelope {
        sender: sender.to_string(),
        recipients: rcpts,
        received_at: 1_700_000_000,
        size: ORIGINAL.len() as u64,
        client_ip: "192.0.2.9".into(),
        helo: "client.example.com".into(),
        auth_user: None,
        ..Envelope::default()
    }
}

fn ctx<'a>(env: &'a Envelope, original: &'a [u8]) -> NoticeContext<'a> {
    NoticeContext {
        reporting_mta: "mail.example.org",
        queue_id: MsgId(0x1234_5678_9ABC),
        envelope: env,
        original,
        now: 1_700_086_400,
        postmaster: "postmaster@example.org",
    }
}

fn failed(index: usize, reply: &str) -> NoticeRecipient {
    NoticeRecipient {
        index,
        reply: reply.to_string(),
        remote_host: Some("mx.example.net[192.0.2.1]:25".to_string()),
        last_attempt: 1_700_000_100,
        will_retry_until: None,
    }
}

fn delayed(index: usize, reply: &str) -> NoticeRecipient {
    NoticeRecipient {
        will_retry_until: Some(1_700_432_000),
        ..failed(index, reply)
    }
}

/// The notice taken apart with mail-parser.
struct Parsed {
    raw: Vec<u8>,
    subject: String,
    /// `type/subtype` of each part of the report, in order.
    types: Vec<String>,
    text: String,
    /// The report's field blocks, unfolded: per-message first.
    blocks: Vec<Vec<(String, String)>>,
    returned: Vec<u8>,
}

impl Parsed {
    fn field<'s>(&'s self, block: usize, name: &str) -> Option<&'s str> {
        self.blocks[block]
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn parse(notice: &Notice) -> Parsed {
    let msg = MessageParser::default()
        .parse(&notice.message)
        .expect("notice parses");
    let ct = msg.content_type().expect("content type");
    assert_eq!(ct.ctype(), "multipart");
    assert_eq!(ct.subtype(), Some("report"));
    assert_eq!(ct.attribute("report-type"), Some("delivery-status"));
    let ids = msg.parts[0].sub_parts().expect("multipart").to_vec();
    let parts: Vec<_> = ids.iter().map(|&i| &msg.parts[i as usize]).collect();
    let types = parts
        .iter()
        .map(|p| {
            let ct = p.content_type().expect("part content type");
            format!("{}/{}", ct.ctype(), ct.subtype().unwrap_or(""))
        })
        .collect();
    let text = parts[0].text_contents().expect("text").to_string();
    let report = String::from_utf8(parts[1].contents().to_vec()).expect("utf-8 report");
    let blocks = report
        .split("\r\n\r\n")
        .filter(|b| !b.trim().is_empty())
        .map(|b| {
            b.replace("\r\n ", " ")
                .split("\r\n")
                .filter(|l| !l.is_empty())
                .map(|l| {
                    let (n, v) = l.split_once(':').expect("field");
                    (n.to_string(), v.trim().to_string())
                })
                .collect()
        })
        .collect();
    let returned = parts
        .get(2)
        .map(|p| p.contents().to_vec())
        .unwrap_or_default();
    Parsed {
        raw: notice.message.clone(),
        subject: msg.subject().unwrap_or("").to_string(),
        types,
        text,
        blocks,
        returned,
    }
}

fn top_headers(raw: &[u8]) -> &[u8] {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("header section");
    &raw[..end + 2]
}

/// Every header section in the notice: the top one and each part's.
fn all_headers(raw: &[u8]) -> Vec<Vec<u8>> {
    let msg = MessageParser::default().parse(raw).expect("parses");
    let mut out = vec![top_headers(raw).to_vec()];
    for p in &msg.parts {
        out.push(raw[p.offset_header as usize..p.offset_body as usize].to_vec());
    }
    out
}

fn assert_lines_ok(raw: &[u8]) {
    assert!(raw.ends_with(b"\r\n"), "ends with CRLF");
    for (i, &b) in raw.iter().enumerate() {
        if b == b'\n' {
            assert_eq!(raw.get(i.wrapping_sub(1)), Some(&b'\r'), "bare LF at {i}");
        }
        if b == b'\r' {
            assert_eq!(raw.get(i + 1), Some(&b'\n'), "bare CR at {i}");
        }
    }
    for line in raw.split(|&b| b == b'\n') {
        assert!(line.len() <= 999, "line of {} octets", line.len());
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn failure_notice_has_the_three_parts_and_every_field() {
    let mut r1 = rcpt("bob@example.net");
    r1.orcpt = Some("rfc822;bobby@example.net".into());
    r1.original = "bobby@example.net".into();
    let mut env = envelope("alice@example.com", vec![r1, rcpt("carol@example.net")]);
    env.envid = Some("QQ314159".into());
    let c = ctx(&env, ORIGINAL);
    let rcpts = [
        failed(0, "550 5.1.1 <bob@example.net>: user unknown"),
        NoticeRecipient {
            remote_host: None,
            ..failed(1, "554 no such domain")
        },
    ];
    assert_eq!(
        notice_recipient(&c, NoticeKind::Failure, &rcpts),
        NoticeTo::Sender("alice@example.com".into())
    );
    let n = build_notice(&c, NoticeKind::Failure, &rcpts).expect("a notice");
    assert_eq!(n.to, "alice@example.com");
    assert!(!n.smtputf8 && !n.eight_bit);
    assert_lines_ok(&n.message);
    let p = parse(&n);
    assert_eq!(
        p.types,
        ["text/plain", "message/delivery-status", "message/rfc822"]
    );
    assert_eq!(p.subject, "Undelivered Mail Returned to Sender");

    let head = String::from_utf8(top_headers(&p.raw).to_vec()).unwrap();
    assert!(
        head.contains("From: \"Mail Delivery System\" <MAILER-DAEMON@mail.example.org>\r\n")
            || head.contains("From: Mail Delivery System <MAILER-DAEMON@mail.example.org>\r\n"),
        "{head}"
    );
    assert!(head.contains("To: <alice@example.com>\r\n"), "{head}");
    assert!(head.contains("Auto-Submitted: auto-replied\r\n"));
    assert!(head.contains("MIME-Version: 1.0\r\n"));
    assert!(
        head.contains("Date: Wed, 15 Nov 2023 22:13:20 +0000\r\n"),
        "{head}"
    );
    assert!(head.contains("Message-ID: <0000123456789ABC.1700086400.F@mail.example.org>\r\n"));

    assert_eq!(p.blocks.len(), 3, "{:?}", p.blocks);
    assert_eq!(p.field(0, "Reporting-MTA"), Some("dns; mail.example.org"));
    assert_eq!(p.field(0, "Original-Envelope-Id"), Some("QQ314159"));
    assert_eq!(
        p.field(0, "Arrival-Date"),
        Some("Tue, 14 Nov 2023 22:13:20 +0000")
    );
    assert_eq!(
        p.field(1, "Original-Recipient"),
        Some("rfc822;bobby@example.net")
    );
    assert_eq!(
        p.field(1, "Final-Recipient"),
        Some("rfc822; bob@example.net")
    );
    assert_eq!(p.field(1, "Action"), Some("failed"));
    assert_eq!(p.field(1, "Status"), Some("5.1.1"));
    assert_eq!(p.field(1, "Remote-MTA"), Some("dns; mx.example.net"));
    assert_eq!(
        p.field(1, "Diagnostic-Code"),
        Some("smtp; 550 5.1.1 <bob@example.net>: user unknown")
    );
    assert_eq!(
        p.field(1, "Last-Attempt-Date"),
        Some("Tue, 14 Nov 2023 22:15:00 +0000")
    );
    assert_eq!(p.field(1, "Will-Retry-Until"), None);
    assert_eq!(p.field(2, "Original-Recipient"), None);
    assert_eq!(
        p.field(2, "Final-Recipient"),
        Some("rfc822; carol@example.net")
    );
    assert_eq!(p.field(2, "Status"), Some("5.0.0"));
    assert_eq!(p.field(2, "Remote-MTA"), None);

    assert!(p.text.contains("mail.example.org"));
    assert!(p.text.contains("<bob@example.net>: delivery failed"));
    assert!(
        p.text
            .contains("host mx.example.net[192.0.2.1]:25 said: 550 5.1.1")
    );
    assert!(p.text.contains("the mail system said: 554 no such domain"));
    assert_eq!(p.returned, ORIGINAL);
}

#[test]
fn delay_notice_is_transient_and_says_until_when() {
    let env = envelope("alice@example.com", vec![rcpt("bob@example.net")]);
    let c = ctx(&env, ORIGINAL);
    let n = build_notice(
        &c,
        NoticeKind::Delay,
        &[delayed(0, "451 4.7.1 greylisted, try later")],
    )
    .expect("a notice");
    assert_lines_ok(&n.message);
    let p = parse(&n);
    assert_eq!(p.subject, "Delayed Mail (still being retried)");
    assert_eq!(p.field(1, "Action"), Some("delayed"));
    assert_eq!(p.field(1, "Status"), Some("4.7.1"));
    assert_eq!(
        p.field(1, "Will-Retry-Until"),
        Some("Sun, 19 Nov 2023 22:13:20 +0000")
    );
    assert!(p.text.contains("still trying"));
    assert_eq!(p.types[2], "text/rfc822-headers", "a delay returns no body");
    assert!(!contains(&n.message, b"See you at noon."));
    assert!(p.text.contains("Sun, 19 Nov 2023 22:13:20 +0000"));
    assert!(contains(&p.raw, b".1700086400.D@mail.example.org>"));
}

#[test]
fn status_comes_from_the_enhanced_code_or_the_basic_one() {
    use NoticeKind::*;
    let s = |r: &str, k| status(r, k).to_string();
    assert_eq!(s("550 5.1.1 user unknown", Failure), "5.1.1");
    assert_eq!(s("550-5.7.26 unauthenticated", Failure), "5.7.26");
    assert_eq!(
        s("552 4.2.2 mailbox full", Failure),
        "5.0.0",
        "class mismatch"
    );
    assert_eq!(s("554 transaction failed", Failure), "5.0.0");
    assert_eq!(s("421 4.4.2 timeout", Failure), "4.4.2");
    assert_eq!(s("450 mailbox busy", Failure), "4.0.0");
    assert_eq!(s("", Failure), "5.0.0");
    assert_eq!(s("250 2.0.0 ok", Failure), "5.0.0");
    assert_eq!(s("connection refused", Failure), "5.0.0");
    assert_eq!(s("", Delay), "4.0.0");
    assert_eq!(s("451 4.3.0 try again", Delay), "4.3.0");
    assert_eq!(s("550 5.1.1 user unknown", Delay), "4.1.1");
    assert_eq!(s("451 try again", Delay), "4.0.0");
    assert_eq!(s("ä5ü", Delay), "4.0.0");
}

#[test]
fn ret_hdrs_returns_only_the_header_section() {
    let mut env = envelope("alice@example.com", vec![rcpt("bob@example.net")]);
    env.ret = Some("HDRS".into());
    let n = build_notice(
        &ctx(&env, ORIGINAL),
        NoticeKind::Failure,
        &[failed(0, "550 no")],
    )
    .expect("a notice");
    let p = parse(&n);
    assert_eq!(p.types[2], "text/rfc822-headers");
    let head_len = ORIGINAL.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 2;
    assert_eq!(p.returned, &ORIGINAL[..head_len]);
    assert!(!contains(&n.message, b"See you at noon."));
}

#[test]
fn ret_full_and_absent_return_the_whole_message() {
    for ret in [Some("FULL"), None] {
        let mut env = envelope("alice@example.com", vec![rcpt("bob@example.net")]);
        env.ret = ret.map(String::from);
        let n = build_notice(
            &ctx(&env, ORIGINAL),
            NoticeKind::Failure,
            &[failed(0, "550 no")],
        )
        .expect("a notice");
        let p = parse(&n);
        assert_eq!(p.types[2], "message/rfc822");
        assert_eq!(p.returned, ORIGINAL);
    }
}

#[test]
fn an_oversized_original_is_returned_as_its_headers() {
    let mut big = ORIGINAL.to_vec();
    for _ in 0..(RETURN_LIMIT / 70 + 1) {
        big.extend_from_slice(&[b'x'; 70]);
        big.extend_from_slice(b"\r\n");
    }
    let env = envelope("alice@example.com", vec![rcpt("bob@example.net")]);
    let n = build_notice(
        &ctx(&env, &big),
        NoticeKind::Failure,
        &[failed(0, "550 no")],
    )
    .expect("a notice");
    assert_lines_ok(&n.message);
    let p = parse(&n);
    assert_eq!(p.types[2], "text/rfc822-headers");
    assert!(p.returned.starts_with(b"From: Alice"));
    assert!(n.message.len() < 8 * 1024);
}

#[test]
fn an_original_with_long_or_bare_lines_is_not_returned_verbatim() {
    let long = [ORIGINAL, &[b'y'; 2000][..], b"\r\n"].concat();
    let bare = b"Subject: x\nX-Bad: a\rb\r\n\r\nbody\n".to_vec();
    let no_body = b"Subject: only headers, no end".to_vec();
    for original in [long, bare, no_body] {
        let env = envelope("alice@example.com", vec![rcpt("bob@example.net")]);
        let n = build_notice(
            &ctx(&env, &original),
            NoticeKind::Failure,
            &[failed(0, "550 no")],
        )
        .expect("a notice");
        assert_lines_ok(&n.message);
        let p = parse(&n);
        assert_eq!(p.types.len(), 3);
        assert_eq!(p.types[2], "text/rfc822-headers");
    }
}

#[test]
fn notify_decides_which_recipients_and_whether_at_all() {
    let with = |notify: Option<&str>| {
        let mut r = rcpt("bob@example.net");
        r.notify = notify.map(String::from);
        envelope("alice@example.com", vec![r])
    };
    let cases = [
        (Some("NEVER"), false, false),
        (Some("SUCCESS"), false, false),
        (Some("FAILURE"), true, false),
        (Some("DELAY"), false, true),
        (Some("SUCCESS,FAILURE,DELAY"), true, true),
        (Some("failure,delay"), true, true),
        (None, true, true),
    ];
    for (notify, failure, delay) in cases {
        let env = with(notify);
        let c = ctx(&env, ORIGINAL);
        let f = build_notice(&c, NoticeKind::Failure, &[failed(0, "550 no")]);
        let d = build_notice(&c, NoticeKind::Delay, &[delayed(0, "451 later")]);
        assert_eq!(f.is_some(), failure, "{notify:?} failure");
        assert_eq!(d.is_some(), delay, "{notify:?} delay");
        let to = notice_recipient(&c, NoticeKind::Failure, &[failed(0, "550 no")]);
        assert_eq!(to == NoticeTo::Nobody, !failure);
    }

    // Only the recipients that asked are reported.
    let mut quiet = rcpt("quiet@example.net");
    quiet.notify = Some("NEVER".into());
    let env = envelope("alice@example.com", vec![quiet, rcpt("bob@example.net")]);
    let n = build_notice(
        &ctx(&env, ORIGINAL),
        NoticeKind::Failure,
        &[failed(0, "550 a"), failed(1, "550 b")],
    )
    .expect("a notice");
    let p = parse(&n);
    assert_eq!(p.blocks.len(), 2);
    assert_eq!(
        p.field(1, "Final-Recipient"),
        Some("rfc822; bob@example.net")
    );
    assert!(!p.text.contains("quiet@"));
}

#[test]
fn unknown_indexes_are_skipped() {
    let env = envelope("alice@example.com", vec![rcpt("bob@example.net")]);
    let c = ctx(&env, ORIGINAL);
    assert!(build_notice(&c, NoticeKind::Failure, &[failed(7, "550 no")]).is_none());
    assert!(build_notice(&c, NoticeKind::Failure, &[]).is_none());
}

#[test]
fn a_failed_notice_goes_to_the_postmaster_once() {
    let env = envelope("", vec![rcpt("alice@example.com")]);
    let c = ctx(&env, ORIGINAL);
    let rcpts = [failed(0, "550 5.1.1 gone")];
    assert_eq!(
        notice_recipient(&c, NoticeKind::Failure, &rcpts),
        NoticeTo::Postmaster("postmaster@example.org".into())
    );
    let n = build_notice(&c, NoticeKind::Failure, &rcpts).expect("a double bounce");
    assert_eq!(n.to, "postmaster@example.org");
    let p = parse(&n);
    assert!(p.subject.contains("double bounce"), "{}", p.subject);
    assert!(p.text.contains("postmaster"));
    assert!(p.text.contains("Sender: <>"));
    // Nobody is told that a notice is late.
    assert_eq!(
        notice_recipient(&c, NoticeKind::Delay, &[delayed(0, "451 later")]),
        NoticeTo::Nobody
    );
    assert!(build_notice(&c, NoticeKind::Delay, &[delayed(0, "451 later")]).is_none());
}

#[test]
fn a_notice_to_the_postmaster_that_fails_is_dropped() {
    for address in [
        "postmaster@example.org",
        "Postmaster@EXAMPLE.org",
        "postmaster",
    ] {
        let env = envelope("", vec![rcpt(address)]);
        let c = ctx(&env, ORIGINAL);
        let rcpts = [failed(0, "550 no")];
        assert_eq!(
            notice_recipient(&c, NoticeKind::Failure, &rcpts),
            NoticeTo::Nobody
        );
        assert!(build_notice(&c, NoticeKind::Failure, &rcpts).is_none());
    }
    // Reached through an alias: the address given at RCPT counts.
    let mut r = rcpt("root@example.org");
    r.original = "postmaster@example.org".into();
    let env = envelope("", vec![r, rcpt("bob@example.net")]);
    let c = ctx(&env, ORIGINAL);
    let rcpts = [failed(0, "550 a"), failed(1, "550 b")];
    let n = build_notice(&c, NoticeKind::Failure, &rcpts).expect("about bob");
    let p = parse(&n);
    assert_eq!(p.blocks.len(), 2);
    assert_eq!(
        p.field(1, "Final-Recipient"),
        Some("rfc822; bob@example.net")
    );
    // The postmaster's own mail from a real sender bounces as usual.
    let env = envelope("alice@example.com", vec![rcpt("postmaster@example.org")]);
    assert!(build_notice(&ctx(&env, ORIGINAL), NoticeKind::Failure, &rcpts[..1]).is_some());
}

#[test]
fn non_ascii_addresses_make_a_global_report() {
    let mut env = envelope("álvaro@exämple.com", vec![rcpt("bøb@example.net")]);
    env.smtputf8 = true;
    let original = "From: álvaro@exämple.com\r\nSubject: café\r\n\r\nhé\r\n".as_bytes();
    let n = build_notice(
        &ctx(&env, original),
        NoticeKind::Failure,
        &[failed(0, "550 5.1.1 <bøb@example.net>: unknown")],
    )
    .expect("a notice");
    assert!(n.smtputf8 && n.eight_bit);
    assert_eq!(n.to, "álvaro@exämple.com");
    assert_lines_ok(&n.message);
    let p = parse(&n);
    assert_eq!(
        p.types,
        [
            "text/plain",
            "message/global-delivery-status",
            "message/global"
        ]
    );
    assert_eq!(
        p.field(1, "Final-Recipient"),
        Some("utf-8; bøb@example.net")
    );
    assert_eq!(
        p.field(1, "Diagnostic-Code"),
        Some("smtp; 550 5.1.1 <bøb@example.net>: unknown")
    );
    assert!(p.text.contains("<bøb@example.net>: delivery failed"));
    assert_eq!(p.returned, original);
    let head = String::from_utf8(top_headers(&n.message).to_vec()).unwrap();
    assert!(head.contains("To: <álvaro@exämple.com>\r\n"), "{head}");

    let n = build_notice(
        &ctx(&env, original),
        NoticeKind::Delay,
        &[delayed(0, "451 later")],
    )
    .expect("a notice");
    let p = parse(&n);
    assert_eq!(p.types[2], "message/global-headers");
    assert_eq!(
        p.returned,
        "From: álvaro@exämple.com\r\nSubject: café\r\n".as_bytes()
    );

    // Without SMTPUTF8 but a non-ASCII address the report is global too; an
    // ASCII original stays message/rfc822.
    let env = envelope("alice@example.com", vec![rcpt("bøb@example.net")]);
    let n = build_notice(
        &ctx(&env, ORIGINAL),
        NoticeKind::Failure,
        &[failed(0, "550 no")],
    )
    .expect("a notice");
    assert!(n.smtputf8);
    let p = parse(&n);
    assert_eq!(p.types[1], "message/global-delivery-status");
    assert_eq!(p.types[2], "message/rfc822");

    // An ASCII report says a non-ASCII reply with '?'.
    let env = envelope("alice@example.com", vec![rcpt("bob@example.net")]);
    let n = build_notice(
        &ctx(&env, ORIGINAL),
        NoticeKind::Failure,
        &[failed(0, "550 nö")],
    )
    .expect("a notice");
    assert!(!n.smtputf8);
    let p = parse(&n);
    assert_eq!(p.field(1, "Diagnostic-Code"), Some("smtp; 550 n?"));
    assert!(p.text.contains("550 nö"));
}

#[test]
fn output_is_deterministic_and_the_boundary_avoids_the_content() {
    let env = envelope("alice@example.com", vec![rcpt("bob@example.net")]);
    let c = ctx(&env, ORIGINAL);
    let a = build_notice(&c, NoticeKind::Failure, &[failed(0, "550 no")]).unwrap();
    let b = build_notice(&c, NoticeKind::Failure, &[failed(0, "550 no")]).unwrap();
    assert_eq!(a, b);

    let base = format!("tern-dsn-{}-{}-F", c.queue_id, c.now);
    let hostile = format!(
        "Subject: x\r\n\r\n--{base}\r\nContent-Type: text/plain\r\n\r\nforged\r\n--{base}.1--\r\n"
    );
    let c = ctx(&env, hostile.as_bytes());
    let n = build_notice(&c, NoticeKind::Failure, &[failed(0, "550 no")]).unwrap();
    assert!(
        contains(&n.message, format!("boundary=\"{base}.2\"").as_bytes())
            || contains(&n.message, format!("boundary={base}.2").as_bytes())
    );
    let p = parse(&n);
    assert_eq!(p.types.len(), 3);
    assert_eq!(p.returned, hostile.as_bytes());
}

#[test]
fn remote_mta_is_the_host_name() {
    assert_eq!(
        remote_mta_name("mx.example.net[192.0.2.1]:25"),
        "mx.example.net"
    );
    assert_eq!(remote_mta_name("[192.0.2.1]:25"), "192.0.2.1");
    assert_eq!(remote_mta_name("[2001:db8::1]:25"), "2001:db8::1");
    assert_eq!(remote_mta_name("mx.example.net:25"), "mx.example.net");
    assert_eq!(remote_mta_name("mx.example.net"), "mx.example.net");
    assert_eq!(remote_mta_name("evil\r\nX: y[1.2.3.4]"), "evilX:y");
}

#[test]
fn the_text_reads_well_with_python_email() {
    // A second parser's view, when Python is around; mail-parser is lenient.
    let Ok(out) = std::process::Command::new("python3")
        .arg("--version")
        .output()
    else {
        return;
    };
    if !out.status.success() {
        return;
    }
    let mut r = rcpt("bob@example.net");
    r.orcpt = Some("rfc822;bob@example.net".into());
    let env = envelope("alice@example.com", vec![r]);
    let n = build_notice(
        &ctx(&env, ORIGINAL),
        NoticeKind::Failure,
        &[failed(0, &format!("550 5.1.1 {}", "word ".repeat(300)))],
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dsn.eml");
    std::fs::write(&path, &n.message).unwrap();
    let script = r#"
import email, email.policy, sys
m = email.message_from_bytes(open(sys.argv[1], 'rb').read(), policy=email.policy.SMTP)
assert not m.defects, m.defects
assert m.get_content_type() == 'multipart/report', m.get_content_type()
parts = m.get_payload()
assert [p.get_content_type() for p in parts] == ['text/plain', 'message/delivery-status', 'message/rfc822']
for p in m.walk():
    assert not p.defects, p.defects
status = parts[1].get_payload()
assert len(status) == 2, status
assert status[1]['Action'] == 'failed'
assert status[1]['Status'] == '5.1.1'
assert parts[2].get_payload()[0]['Subject'] == 'lunch'
"#;
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn reply_text() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,200}",
        "[ -~\r\n\t\0]{0,300}",
        "[a-z\r\n]{4000,5000}",
        "[a-z]{5000}",
        "[!-~]{1000,5000}",
        "([!-~]{1,1200} ?){1,8}",
        "[0-9 .]{0,20}[\r\n\0\u{7f}\u{85}ä€ -~]{0,100}",
        Just(String::new()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Whatever the replies and hosts hold, every line ends CRLF, none is
    /// over 998 octets, and no reply text reaches a header.
    #[test]
    fn replies_never_break_lines_or_headers(
        replies in proptest::collection::vec(reply_text(), 1..4),
        host in proptest::option::of(".{0,100}"),
        smtputf8 in any::<bool>(),
        delay in any::<bool>(),
        ret_hdrs in any::<bool>(),
    ) {
        let rcpts: Vec<Recipient> = (0..replies.len())
            .map(|i| rcpt(&format!("user{i}@example.net")))
            .collect();
        let mut env = envelope("alice@example.com", rcpts);
        env.smtputf8 = smtputf8;
        env.ret = ret_hdrs.then(|| "HDRS".to_string());
        let c = ctx(&env, ORIGINAL);
        let kind = if delay { NoticeKind::Delay } else { NoticeKind::Failure };
        let marked: Vec<NoticeRecipient> = replies
            .iter()
            .enumerate()
            .map(|(i, r)| NoticeRecipient {
                remote_host: host.as_ref().map(|h| format!("QZXH{h}")),
                ..delayed(i, &format!("QZX{r}"))
            })
            .collect();
        let n = build_notice(&c, kind, &marked).expect("a notice");
        assert_lines_ok(&n.message);
        for h in all_headers(&n.message) {
            prop_assert!(!contains(&h, b"QZX"), "{}", String::from_utf8_lossy(&h));
        }
        let p = parse(&n);
        prop_assert_eq!(p.types.len(), 3);
        prop_assert_eq!(p.blocks.len(), 1 + replies.len());
        for (i, r) in replies.iter().enumerate() {
            // The report keeps the reply's words (folding only moves spaces).
            let diag = p.field(i + 1, "Diagnostic-Code").expect("diagnostic");
            let words = |s: &str| -> String { s.chars().filter(|c| !c.is_whitespace() && !c.is_control()).collect() };
            // Control characters become spaces; in an ASCII report other
            // non-ASCII characters, Unicode spaces among them, become '?'.
            let ascii = !n.smtputf8;
            let expected: String = format!("QZX{r}")
                .chars()
                .filter(|c| !c.is_control())
                .map(|c| if ascii && !c.is_ascii() { '?' } else { c })
                .filter(|c| !c.is_whitespace())
                .collect();
            prop_assert_eq!(words(diag.trim_start_matches("smtp;")), expected);
        }
    }

    /// Arbitrary originals never break the output's lines either.
    #[test]
    fn originals_never_break_lines(
        original in proptest::collection::vec(
            prop_oneof![Just(b'\r'), Just(b'\n'), Just(0u8), 32u8..127, any::<u8>()],
            0..3000,
        ),
        ret_hdrs in any::<bool>(),
    ) {
        let mut env = envelope("alice@example.com", vec![rcpt("bob@example.net")]);
        env.ret = ret_hdrs.then(|| "HDRS".to_string());
        let n = build_notice(&ctx(&env, &original), NoticeKind::Failure, &[failed(0, "550 no")])
            .expect("a notice");
        assert_lines_ok(&n.message);
        let p = parse(&n);
        prop_assert!(p.types.len() >= 2);
    }
}

#[test]
fn an_empty_reply_has_no_diagnostic_code() {
    let env = envelope("alice@example.com", vec![rcpt("bob@example.net")]);
    let n = build_notice(
        &ctx(&env, ORIGINAL),
        NoticeKind::Failure,
        &[failed(0, " \r\n")],
    )
    .expect("a notice");
    let p = parse(&n);
    assert_eq!(p.field(1, "Diagnostic-Code"), None);
    assert_eq!(p.field(1, "Status"), Some("5.0.0"));
    assert_eq!(p.field(1, "Remote-MTA"), Some("dns; mx.example.net"));
    assert!(
        p.text
            .contains("host mx.example.net[192.0.2.1]:25 gave no reason.")
    );
}
