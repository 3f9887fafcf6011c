//! Transcript tests of mail transactions: pipelining, per-recipient
//! outcomes, recipient limits, checks before sending, DATA and BDAT, LMTP,
//! connection reuse.

use super::tests::*;
use super::*;
use crate::command::{Notify, Orcpt, Ret};
use crate::reply::EnhancedCode;

const MSG: &str = "Subject: t\r\n\r\nbody\r\n";

#[test]
fn pipelined_mail_and_three_rcpts_in_one_write() {
    let mut h = ready_with(config(), EHLO_PIPE);
    h.writes.clear();
    h.send(message(
        "a@b.test",
        &["x@d.test", "y@d.test", "z@d.test"],
        MSG,
    ));
    assert_eq!(h.writes.len(), 1, "one write: {:?}", h.writes);
    assert_eq!(
        h.written(),
        "MAIL FROM:<a@b.test>\r\nRCPT TO:<x@d.test>\r\nRCPT TO:<y@d.test>\r\nRCPT TO:<z@d.test>\r\n"
    );
    assert_eq!(h.c.stage(), Some(Stage::Mail));
    h.server("250 2.1.0 ok\r\n250 2.1.5 ok\r\n");
    assert_eq!(h.c.stage(), Some(Stage::Rcpt));
    // DATA waits for every RCPT reply (see the module header).
    assert_eq!(h.written(), "");
    h.server("250 2.1.5 ok\r\n250 2.1.5 ok\r\n");
    assert_eq!(h.written(), "DATA\r\n");
    assert_eq!(h.c.stage(), Some(Stage::DataInit));
    h.server("354 go\r\n");
    assert_eq!(h.written(), format!("{MSG}.\r\n"));
    assert_eq!(h.c.stage(), Some(Stage::DataEnd));
    h.server("250 2.0.0 queued as X\r\n");
    let o = &h.outcomes()[0];
    assert_eq!(statuses(o), vec![Status::Delivered; 3]);
    assert_eq!(o.recipients[0].reply.to_string(), "250 2.0.0 queued as X");
    assert_eq!(h.events.last(), Some(&Event::Ready));
}

#[test]
fn one_of_three_rcpts_refused() {
    let mut h = ready_with(config(), EHLO_PIPE);
    h.send(message(
        "a@b.test",
        &["x@d.test", "nobody@d.test", "z@d.test"],
        MSG,
    ));
    h.written();
    h.server("250 ok\r\n250 ok\r\n550 5.1.1 no such user\r\n250 ok\r\n354 go\r\n");
    assert!(h.written().starts_with("DATA\r\nSubject"));
    h.server("250 ok\r\n");
    let o = &h.outcomes()[0];
    assert_eq!(
        statuses(o),
        vec![Status::Delivered, Status::Permanent, Status::Delivered]
    );
    let r = &o.recipients[1];
    assert_eq!(
        (r.reply.code, r.reply.enhanced),
        (550, Some(EnhancedCode(5, 1, 1)))
    );
    assert_eq!(r.reply.lines, vec!["no such user"]);
    assert!(!r.local);
}

#[test]
fn mail_refused_fails_every_recipient() {
    let mut h = ready_with(config(), EHLO_PIPE);
    h.send(message("a@b.test", &["x@d.test", "y@d.test"], MSG));
    h.written();
    h.server("553 5.7.1 sender rejected\r\n503 5.5.1 no MAIL\r\n503 5.5.1 no MAIL\r\n");
    let o = &h.outcomes()[0];
    assert_eq!(statuses(o), vec![Status::Permanent; 2]);
    assert!(o.recipients.iter().all(|r| r.reply.code == 553));
    // MAIL was refused: nothing to RSET.
    assert_eq!(h.written(), "");
    assert_eq!(h.events.last(), Some(&Event::Ready));
}

#[test]
fn all_rcpts_refused_means_rset_not_data() {
    let mut h = ready_with(config(), EHLO_PIPE);
    h.send(message("a@b.test", &["x@d.test", "y@d.test"], MSG));
    h.written();
    h.server("250 ok\r\n450 4.2.0 greylisted\r\n550 5.1.1 unknown\r\n");
    assert_eq!(h.written(), "RSET\r\n");
    h.server("250 ok\r\n");
    assert_eq!(
        statuses(&h.outcomes()[0]),
        vec![Status::Temporary, Status::Permanent]
    );
}

#[test]
fn final_reply_applies_to_every_accepted_recipient() {
    for (reply, status) in [
        ("451 4.3.0 try later\r\n", Status::Temporary),
        ("554 5.7.1 spam\r\n", Status::Permanent),
    ] {
        let mut h = ready_with(config(), EHLO_PIPE);
        h.send(message(
            "a@b.test",
            &["x@d.test", "y@d.test", "z@d.test"],
            MSG,
        ));
        h.server("250 ok\r\n250 ok\r\n550 no\r\n250 ok\r\n354 go\r\n");
        h.written();
        h.server(reply);
        let o = &h.outcomes()[0];
        assert_eq!(statuses(o), vec![status, Status::Permanent, status]);
        // The server ended the transaction itself: no RSET.
        assert_eq!(h.written(), "");
    }
}

#[test]
fn data_refused_then_rset() {
    let mut h = ready_with(config(), EHLO_PIPE);
    h.send(message("a@b.test", &["x@d.test"], MSG));
    h.server("250 ok\r\n250 ok\r\n");
    h.written();
    h.server("451 4.3.0 no DATA now\r\n");
    assert_eq!(h.written(), "RSET\r\n");
    h.server("250 ok\r\n");
    assert_eq!(statuses(&h.outcomes()[0]), vec![Status::Temporary]);
}

#[test]
fn too_many_recipients_452_goes_in_the_next_transaction() {
    let mut h = ready_with(config(), EHLO_PIPE);
    h.send(message(
        "a@b.test",
        &["r1@d.test", "r2@d.test", "r3@d.test"],
        MSG,
    ));
    h.written();
    h.server(
        "250 ok\r\n250 ok\r\n452 4.5.3 too many recipients\r\n452 4.5.3 too many recipients\r\n",
    );
    h.server("354 go\r\n");
    h.written();
    h.server("250 ok\r\n");
    assert!(h.outcomes().is_empty(), "the message is not done yet");
    // The deferred ones, in a second transaction on the same connection.
    assert_eq!(
        h.written(),
        "MAIL FROM:<a@b.test>\r\nRCPT TO:<r2@d.test>\r\nRCPT TO:<r3@d.test>\r\n"
    );
    h.server("250 ok\r\n250 ok\r\n452 4.5.3 too many recipients\r\n");
    h.server("354 go\r\n250 ok\r\n");
    h.written();
    // Third transaction: the server accepts none, so r3 is deferred for good.
    assert_eq!(h.written(), "");
    h.drain();
    let w = String::from_utf8_lossy(&h.writes.concat()).into_owned();
    assert!(
        w.ends_with("MAIL FROM:<a@b.test>\r\nRCPT TO:<r3@d.test>\r\n"),
        "{w}"
    );
    h.server("250 ok\r\n452 4.5.3 too many recipients\r\n");
    assert_eq!(h.written(), "RSET\r\n");
    h.server("250 ok\r\n");
    let o = &h.outcomes()[0];
    assert_eq!(
        statuses(o),
        vec![Status::Delivered, Status::Delivered, Status::Temporary]
    );
    assert_eq!(o.recipients[2].reply.code, 452);
}

#[test]
fn max_recipients_splits_transactions() {
    let cfg = ClientConfig {
        max_recipients: 2,
        ..config()
    };
    let mut h = ready_with(cfg, EHLO_PIPE);
    h.send(message(
        "a@b.test",
        &["r1@d.test", "r2@d.test", "r3@d.test"],
        MSG,
    ));
    assert_eq!(h.written().matches("RCPT").count(), 2);
    h.server("250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n");
    h.written();
    h.server("250 ok\r\n");
    assert_eq!(
        h.written(),
        "MAIL FROM:<a@b.test>\r\nRCPT TO:<r3@d.test>\r\n"
    );
    h.server("250 ok\r\n250 ok\r\n354 go\r\n250 ok\r\n");
    assert_eq!(statuses(&h.outcomes()[0]), vec![Status::Delivered; 3]);
}

#[test]
fn size_over_the_servers_limit_fails_before_sending() {
    let mut h = ready_with(config(), "250-mx\r\n250 SIZE 10\r\n");
    h.send(message("a@b.test", &["x@d.test", "y@d.test"], MSG));
    assert_eq!(h.written(), "");
    let o = &h.outcomes()[0];
    assert_eq!(statuses(o), vec![Status::Permanent; 2]);
    let r = &o.recipients[0];
    assert!(r.local);
    assert_eq!(r.reply.enhanced, Some(EnhancedCode(5, 3, 4)));
    assert!(
        r.reply
            .to_string()
            .contains("exceeds the server's limit of 10")
    );
    assert_eq!(
        h.events.last(),
        Some(&Event::Ready),
        "the connection stays usable"
    );
}

#[test]
fn size_param_sent_when_advertised() {
    let mut h = ready_with(config(), "250-mx\r\n250 SIZE\r\n");
    h.send(message("a@b.test", &["x@d.test"], MSG));
    assert_eq!(
        h.written(),
        format!("MAIL FROM:<a@b.test> SIZE={}\r\n", MSG.len())
    );
}

#[test]
fn utf8_envelope_without_smtputf8_fails_clearly() {
    let mut h = ready_with(config(), EHLO_PIPE);
    h.send(message("a@b.test", &["jörg@d.test"], MSG));
    assert_eq!(h.written(), "");
    let r = &h.outcomes()[0].recipients[0];
    assert_eq!(r.status, Status::Permanent);
    assert!(r.reply.to_string().contains("5.6.7"));
    assert!(r.reply.to_string().contains("SMTPUTF8"));

    // With SMTPUTF8 it goes, flagged.
    let mut h = ready_with(config(), EHLO_ALL);
    h.send(message("a@b.test", &["jörg@d.test"], MSG));
    assert!(
        h.written()
            .starts_with("MAIL FROM:<a@b.test> SIZE=20 SMTPUTF8\r\nRCPT TO:<jörg@d.test>")
    );
}

#[test]
fn smtputf8_flag_only_matters_with_utf8_headers() {
    let mut m = message("a@b.test", &["x@d.test"], "Subject: Grüße\r\n\r\nhi\r\n");
    m.params.smtputf8 = true;
    let mut h = ready_with(config(), EHLO_PIPE);
    h.send(m.clone());
    assert!(
        h.outcomes()[0].recipients[0]
            .reply
            .to_string()
            .contains("SMTPUTF8")
    );
    // ASCII headers: an ASCII-only server can carry it (8-bit body is 8BITMIME's business).
    m.content = bytes::Bytes::from_static(b"Subject: hi\r\n\r\nGr\xc3\xbc\xc3\x9fe\r\n");
    let mut h = ready_with(config(), EHLO_PIPE);
    h.send(m);
    assert_eq!(
        h.written(),
        "MAIL FROM:<a@b.test> BODY=8BITMIME\r\nRCPT TO:<x@d.test>\r\n"
    );
}

#[test]
fn eight_bit_without_8bitmime_is_not_converted() {
    let mut h = ready_with(config(), EHLO_BARE);
    h.send(message(
        "a@b.test",
        &["x@d.test"],
        "Subject: x\r\n\r\ncaf\u{e9}\r\n",
    ));
    assert_eq!(h.written(), "");
    let r = &h.outcomes()[0].recipients[0];
    assert_eq!(r.status, Status::Permanent);
    assert_eq!(r.reply.enhanced, Some(EnhancedCode(5, 6, 3)));
    assert!(r.reply.to_string().contains("8BITMIME"));
    // Declared 8BITMIME but 7-bit content goes as the 7-bit text it is.
    let mut m = message("a@b.test", &["x@d.test"], MSG);
    m.params.body = Some(crate::command::BodyType::EightBitMime);
    let mut h = ready_with(config(), EHLO_BARE);
    h.send(m.clone());
    assert_eq!(h.written(), "MAIL FROM:<a@b.test>\r\n");
    let mut h = ready_with(config(), EHLO_PIPE);
    h.send(m);
    assert!(
        h.written()
            .starts_with("MAIL FROM:<a@b.test> BODY=8BITMIME\r\n")
    );
}

fn dsn_message() -> Message {
    let mut m = message("a@b.test", &["x@d.test", "y@d.test"], MSG);
    m.params.ret = Some(Ret::Hdrs);
    m.params.envid = Some("id+1 x".into());
    m.recipients[0].params.notify = Some(Notify {
        success: true,
        failure: true,
        ..Notify::default()
    });
    m.recipients[0].params.orcpt = Some(Orcpt {
        addr_type: "rfc822".into(),
        address: "x+tag@d.test".into(),
        raw_utf8: false,
    });
    m.recipients[1].params.notify = Some(Notify {
        never: true,
        ..Notify::default()
    });
    m.recipients[1].params.orcpt = Some(Orcpt {
        addr_type: "utf-8".into(),
        address: "jö=rg@d.test".into(),
        raw_utf8: false,
    });
    m
}

#[test]
fn dsn_params_only_when_advertised() {
    let mut h = ready_with(config(), EHLO_PIPE);
    h.send(dsn_message());
    assert_eq!(
        h.written(),
        "MAIL FROM:<a@b.test>\r\nRCPT TO:<x@d.test>\r\nRCPT TO:<y@d.test>\r\n"
    );
    h.server("250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n250 ok\r\n");
    assert!(!h.outcomes()[0].dsn);

    let mut h = ready_with(config(), "250-mx\r\n250-PIPELINING\r\n250 DSN\r\n");
    h.send(dsn_message());
    assert_eq!(
        h.written(),
        "MAIL FROM:<a@b.test> RET=HDRS ENVID=id+2B1+20x\r\n\
         RCPT TO:<x@d.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x+2Btag@d.test\r\n\
         RCPT TO:<y@d.test> NOTIFY=NEVER ORCPT=utf-8;j\\x{F6}\\x{3D}rg@d.test\r\n"
    );
    h.server("250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n250 ok\r\n");
    assert!(h.outcomes()[0].dsn);
}

#[test]
fn orcpt_written_by_us_parses_back_on_our_server() {
    // What the client writes, the server's parser reads as the same ORCPT.
    let m = dsn_message();
    for smtputf8 in [false, true] {
        for r in &m.recipients {
            let line = transaction_rcpt_line(r, smtputf8);
            let words: Vec<&str> = line.split(' ').skip(2).collect();
            let back = RcptParams::parse(&words).unwrap();
            assert_eq!(
                back.orcpt.as_ref().unwrap().address,
                r.params.orcpt.as_ref().unwrap().address
            );
        }
    }
}

fn transaction_rcpt_line(r: &Recipient, smtputf8: bool) -> String {
    // Through a real client so the test covers the public path.
    let caps = if smtputf8 {
        "250-mx\r\n250-PIPELINING\r\n250-SMTPUTF8\r\n250 DSN\r\n"
    } else {
        "250-mx\r\n250-PIPELINING\r\n250 DSN\r\n"
    };
    let mut h = ready_with(config(), caps);
    let mut m = message("a@b.test", &[], MSG);
    m.params.smtputf8 = smtputf8;
    m.recipients = vec![r.clone()];
    h.send(m);
    let w = h.written();
    w.lines().nth(1).unwrap().to_string()
}

#[test]
fn control_characters_in_an_address_are_never_sent() {
    let mut m = message("a@b.test", &["x@d.test", "y@d.test"], MSG);
    let ForwardPath::Mailbox(mb) = &mut m.recipients[1].to else {
        unreachable!()
    };
    mb.local_part = "y\r\nRSET".into();
    let mut h = ready_with(config(), EHLO_PIPE);
    h.send(m);
    assert_eq!(
        h.written(),
        "MAIL FROM:<a@b.test>\r\nRCPT TO:<x@d.test>\r\n"
    );
    h.server("250 ok\r\n250 ok\r\n354 go\r\n250 ok\r\n");
    let o = &h.outcomes()[0];
    assert_eq!(statuses(o), vec![Status::Delivered, Status::Permanent]);
    assert!(o.recipients[1].local);
}

#[test]
fn data_is_dot_stuffed_and_line_ends_fixed() {
    let mut h = ready_with(config(), EHLO_PIPE);
    h.send(message(
        "a@b.test",
        &["x@d.test"],
        "Subject: dots\r\n\r\n.hidden\r\n..two\r\nbare\nlf\r\n.\r\nend",
    ));
    h.server("250 ok\r\n250 ok\r\n");
    h.written();
    h.server("354 go\r\n");
    assert_eq!(
        h.written(),
        "Subject: dots\r\n\r\n..hidden\r\n...two\r\nbare\r\nlf\r\n..\r\nend\r\n.\r\n"
    );
}

#[test]
fn data_content_written_a_chunk_at_a_time() {
    let cfg = ClientConfig {
        chunk_size: 10,
        ..config()
    };
    let mut h = ready_with(cfg, EHLO_PIPE);
    let body = format!("Subject: x\r\n\r\n{}\r\n", "abcdefghij\r\n".repeat(10));
    h.send(message("a@b.test", &["x@d.test"], &body));
    h.server("250 ok\r\n250 ok\r\n");
    h.written();
    h.writes.clear();
    h.server("354 go\r\n");
    assert!(h.writes.len() > 5, "{}", h.writes.len());
    assert_eq!(h.written(), format!("{body}.\r\n"));
}

#[test]
fn bdat_pipelined_after_the_rcpts() {
    let mut h = ready_with(config(), EHLO_ALL);
    h.writes.clear();
    h.send(message(
        "a@b.test",
        &["x@d.test", "y@d.test"],
        "Subject: t\r\n\r\n.dot\r\n",
    ));
    assert_eq!(h.writes.len(), 1);
    assert_eq!(
        h.written(),
        "MAIL FROM:<a@b.test> SIZE=20\r\nRCPT TO:<x@d.test>\r\nRCPT TO:<y@d.test>\r\n\
         BDAT 20 LAST\r\nSubject: t\r\n\r\n.dot\r\n"
    );
    h.server("250 ok\r\n250 ok\r\n550 no\r\n");
    assert_eq!(h.c.stage(), Some(Stage::DataEnd));
    h.server("250 2.0.0 ok\r\n");
    assert_eq!(
        statuses(&h.outcomes()[0]),
        vec![Status::Delivered, Status::Permanent]
    );
    assert_eq!(h.written(), "");
}

#[test]
fn bdat_in_chunks_and_without_pipelining() {
    let cfg = ClientConfig {
        chunk_size: 8,
        ..config()
    };
    let mut h = ready_with(cfg, "250-mx\r\n250 CHUNKING\r\n");
    h.send(message("a@b.test", &["x@d.test"], "0123456789abcdef\r\n"));
    assert_eq!(h.written(), "MAIL FROM:<a@b.test>\r\n");
    h.server("250 ok\r\n");
    assert_eq!(h.written(), "RCPT TO:<x@d.test>\r\n");
    h.server("250 ok\r\n");
    // Lines are held back until their end: the first chunk waits for it.
    assert_eq!(h.written(), "BDAT 18 LAST\r\n0123456789abcdef\r\n");
    h.server("250 ok\r\n");
    assert_eq!(statuses(&h.outcomes()[0]), vec![Status::Delivered]);

    let mut h = ready_with(
        ClientConfig {
            chunk_size: 4,
            ..config()
        },
        "250-mx\r\n250 CHUNKING\r\n",
    );
    h.send(message("a@b.test", &["x@d.test"], "ab\r\ncd\r\nef\r\n"));
    h.server("250 ok\r\n250 ok\r\n");
    assert!(
        h.written()
            .ends_with("RCPT TO:<x@d.test>\r\nBDAT 4\r\nab\r\n")
    );
    assert_eq!(h.c.stage(), Some(Stage::DataBlock));
    h.server("250 ok\r\n");
    assert_eq!(h.written(), "BDAT 4\r\ncd\r\n");
    h.server("250 ok\r\n");
    assert_eq!(h.written(), "BDAT 4 LAST\r\nef\r\n");
    h.server("250 ok\r\n");
    assert_eq!(statuses(&h.outcomes()[0]), vec![Status::Delivered]);
}

#[test]
fn bdat_refused_chunk_stops_the_content_and_rsets() {
    let cfg = ClientConfig {
        chunk_size: 4,
        ..config()
    };
    let mut h = ready_with(cfg, EHLO_ALL);
    h.send(message("a@b.test", &["x@d.test"], "ab\r\ncd\r\nef\r\n"));
    h.written();
    h.server("250 ok\r\n250 ok\r\n552 5.3.4 too big\r\n");
    // Pipelined chunks already written are answered and dropped.
    h.server("503 5.5.1 no\r\n503 5.5.1 no\r\n");
    assert!(h.written().ends_with("RSET\r\n"));
    h.server("250 ok\r\n");
    let r = &h.outcomes()[0].recipients[0];
    assert_eq!((r.status, r.reply.code), (Status::Permanent, 552));
}

#[test]
fn bdat_with_every_rcpt_refused() {
    let mut h = ready_with(config(), EHLO_ALL);
    h.send(message("a@b.test", &["x@d.test"], MSG));
    h.written();
    h.server("250 ok\r\n550 5.1.1 no\r\n554 5.5.1 no valid recipients\r\n");
    assert_eq!(h.written(), "RSET\r\n");
    h.server("250 ok\r\n");
    let r = &h.outcomes()[0].recipients[0];
    assert_eq!((r.status, r.reply.code), (Status::Permanent, 550));
}

#[test]
fn lmtp_one_reply_per_accepted_recipient() {
    let cfg = ClientConfig {
        protocol: Protocol::Lmtp,
        ..config()
    };
    let mut h = Harness::new(cfg);
    h.server("220 lmtp\r\n");
    assert!(h.written().starts_with("LHLO "));
    h.server("250-lmtp\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES\r\n");
    h.send(message(
        "a@b.test",
        &["u1@d.test", "u2@d.test", "u3@d.test", "u4@d.test"],
        MSG,
    ));
    h.server("250 ok\r\n250 ok\r\n550 5.1.1 unknown\r\n250 ok\r\n250 ok\r\n354 go\r\n");
    h.written();
    h.server("250 2.0.0 u1 saved\r\n452 4.2.2 u3 over quota\r\n");
    assert!(h.outcomes().is_empty());
    assert_eq!(h.c.stage(), Some(Stage::DataEnd));
    h.server("552 5.2.2 u4 mailbox full\r\n");
    let o = &h.outcomes()[0];
    assert_eq!(
        statuses(o),
        vec![
            Status::Delivered,
            Status::Permanent,
            Status::Temporary,
            Status::Permanent
        ]
    );
    assert!(o.recipients[2].reply.to_string().contains("u3 over quota"));
    assert_eq!(h.events.last(), Some(&Event::Ready));
}

#[test]
fn lmtp_with_bdat() {
    let cfg = ClientConfig {
        protocol: Protocol::Lmtp,
        ..config()
    };
    let mut h = Harness::new(cfg);
    h.server("220 lmtp\r\n250-lmtp\r\n250-PIPELINING\r\n250 CHUNKING\r\n");
    h.send(message("a@b.test", &["u1@d.test", "u2@d.test"], MSG));
    assert!(h.written().contains("BDAT 20 LAST\r\n"));
    h.server("250 ok\r\n250 ok\r\n250 ok\r\n250 u1\r\n");
    assert!(h.outcomes().is_empty());
    h.server("450 4.2.1 u2 later\r\n");
    assert_eq!(
        statuses(&h.outcomes()[0]),
        vec![Status::Delivered, Status::Temporary]
    );
}

#[test]
fn three_messages_on_one_connection_with_rset_after_a_failure() {
    let mut h = ready_with(config(), EHLO_PIPE);
    // 1: delivered.
    h.send(message("a@b.test", &["x@d.test"], MSG));
    h.server("250 ok\r\n250 ok\r\n354 go\r\n250 ok 1\r\n");
    assert_eq!(h.outcomes().len(), 1);
    assert!(h.c.can_send());
    h.written();
    // 2: its only recipient refused mid-way: RSET before the next.
    h.send(message("a@b.test", &["gone@d.test"], MSG));
    h.server("250 ok\r\n550 5.1.1 gone\r\n");
    assert!(h.written().ends_with("RSET\r\n"));
    assert!(!h.c.can_send());
    h.server("250 2.0.0 reset\r\n");
    assert_eq!(h.outcomes().len(), 2);
    // 3: delivered, then QUIT.
    h.send(message("c@b.test", &["y@d.test"], MSG));
    assert_eq!(
        h.written(),
        "MAIL FROM:<c@b.test>\r\nRCPT TO:<y@d.test>\r\n"
    );
    h.c.quit();
    h.drain();
    h.server("250 ok\r\n250 ok\r\n354 go\r\n250 ok 3\r\n");
    assert!(h.written().ends_with(".\r\nQUIT\r\n"));
    h.server("221 bye\r\n");
    let o = h.outcomes();
    assert_eq!(o.len(), 3);
    assert_eq!(statuses(&o[0]), vec![Status::Delivered]);
    assert_eq!(statuses(&o[1]), vec![Status::Permanent]);
    assert_eq!(statuses(&o[2]), vec![Status::Delivered]);
    assert_eq!(h.events.iter().filter(|e| **e == Event::Ready).count(), 3);
    assert!(h.closed() && h.failure().is_none());
}

#[test]
fn rset_refused_ends_the_connection() {
    let mut h = ready_with(config(), EHLO_PIPE);
    h.send(message("a@b.test", &["x@d.test"], MSG));
    h.server("250 ok\r\n550 no\r\n");
    h.written();
    h.server("500 what\r\n");
    assert_eq!(h.written(), "QUIT\r\n");
    assert!(h.failure().unwrap().reply.to_string().contains("RSET"));
    assert_eq!(statuses(&h.outcomes()[0]), vec![Status::Permanent]);
}

#[test]
fn busy_while_a_message_is_in_progress() {
    let mut h = ready_with(config(), EHLO_PIPE);
    h.send(message("a@b.test", &["x@d.test"], MSG));
    assert_eq!(
        h.c.send(message("a@b.test", &["x@d.test"], MSG)),
        Err(SendError::Busy)
    );
    let m = message("a@b.test", &[], MSG);
    let mut h = ready_with(config(), EHLO_PIPE);
    h.send(m);
    assert_eq!(h.outcomes()[0].recipients, vec![]);
    assert_eq!(h.written(), "");
}

#[test]
fn a_million_octet_line_arrives_folded_not_cut() {
    let line = "x".repeat(1_000_000);
    let content = format!("Subject: big\r\n\r\n{line}\r\n");
    let mut h = ready_with(config(), EHLO_PIPE);
    h.send(message("a@b.test", &["x@d.test"], &content));
    h.server("250 ok\r\n250 ok\r\n");
    h.written();
    h.server("354 go\r\n");
    let wire = h.written();
    assert!(wire.split("\r\n").all(|l| l.len() <= MAX_TEXT_LINE));
    assert_eq!(wire.matches('x').count(), 1_000_000);
    assert!(wire.ends_with("\r\n.\r\n"));
    h.server("250 ok\r\n");
    assert_eq!(statuses(&h.outcomes()[0]), vec![Status::Delivered]);
}
