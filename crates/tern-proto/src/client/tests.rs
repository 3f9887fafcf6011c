//! Transcript tests of connection setup: greeting, EHLO/HELO/LHLO,
//! STARTTLS policies, AUTH, QUIT. Also the harness the other client test
//! files use.

use super::*;
use crate::address::{parse_forward_path, parse_reverse_path};

/// A client plus everything it emitted so far.
pub(super) struct Harness {
    pub c: Client,
    /// Octets written since the last `written()`.
    pub out: Vec<u8>,
    /// Every event but `Write`, in order.
    pub events: Vec<Event>,
    /// Every `Write`, in order (to check what went in one write).
    pub writes: Vec<Vec<u8>>,
}

impl Harness {
    pub fn new(config: ClientConfig) -> Harness {
        let mut h = Harness {
            c: Client::new(config),
            out: Vec::new(),
            events: Vec::new(),
            writes: Vec::new(),
        };
        h.drain();
        h
    }

    pub fn drain(&mut self) {
        while let Some(e) = self.c.next_event() {
            match e {
                Event::Write(w) => {
                    self.out.extend_from_slice(&w);
                    self.writes.push(w);
                }
                e => self.events.push(e),
            }
        }
    }

    /// The server sends `s`, a line at a time, each after the client's
    /// writes so far were taken (as a real server answers only what it
    /// read; `c.receive` directly sends several at once).
    pub fn server(&mut self, s: &str) {
        for line in s.as_bytes().split_inclusive(|&b| b == b'\n') {
            self.c.receive(line);
            self.drain();
        }
    }

    /// What the client wrote since the last call.
    pub fn written(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.out).into_owned();
        self.out.clear();
        s
    }

    pub fn send(&mut self, m: Message) {
        self.c.send(m).unwrap();
        self.drain();
    }

    /// The outcomes emitted so far.
    pub fn outcomes(&self) -> Vec<MessageOutcome> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::Outcome(o) => Some(o.clone()),
                _ => None,
            })
            .collect()
    }

    pub fn failure(&self) -> Option<ConnectionFailure> {
        self.events.iter().find_map(|e| match e {
            Event::Failed(f) => Some(f.clone()),
            _ => None,
        })
    }

    pub fn closed(&self) -> bool {
        self.events.last() == Some(&Event::Close)
    }
}

pub(super) fn config() -> ClientConfig {
    ClientConfig {
        helo_name: "out.tern.test".into(),
        tls: TlsPolicy::None,
        ..ClientConfig::default()
    }
}

pub(super) const EHLO_ALL: &str = "250-mx.test\r\n250-PIPELINING\r\n250-SIZE 1000000\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250-ENHANCEDSTATUSCODES\r\n250-DSN\r\n250 CHUNKING\r\n";
/// PIPELINING without CHUNKING: the DATA path.
pub(super) const EHLO_PIPE: &str =
    "250-mx.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n";
/// Nothing at all beyond EHLO.
pub(super) const EHLO_BARE: &str = "250 mx.test\r\n";

pub(super) fn rcpt(s: &str) -> Recipient {
    Recipient {
        to: parse_forward_path(&format!("<{s}>")).unwrap().0,
        params: RcptParams::default(),
    }
}

pub(super) fn message(from: &str, to: &[&str], content: &str) -> Message {
    Message {
        from: parse_reverse_path(&format!("<{from}>")).unwrap().0,
        params: MailParams::default(),
        recipients: to.iter().map(|t| rcpt(t)).collect(),
        content: bytes::Bytes::copy_from_slice(content.as_bytes()),
    }
}

/// A client that got the greeting and this EHLO reply.
pub(super) fn ready_with(config: ClientConfig, ehlo: &str) -> Harness {
    let mut h = Harness::new(config);
    h.server("220 mx.test ESMTP\r\n");
    assert!(h.written().starts_with("EHLO out.tern.test\r\n"));
    h.server(ehlo);
    h
}

pub(super) fn statuses(o: &MessageOutcome) -> Vec<Status> {
    o.recipients.iter().map(|r| r.status).collect()
}

#[test]
fn greeting_ehlo_ready_quit() {
    let mut h = Harness::new(config());
    assert_eq!(h.c.stage(), Some(Stage::Greeting));
    assert!(h.out.is_empty());
    h.server("220-mx.test ESMTP\r\n220 more\r\n");
    assert_eq!(h.written(), "EHLO out.tern.test\r\n");
    assert_eq!(h.c.stage(), Some(Stage::Command));
    h.server(EHLO_ALL);
    assert_eq!(h.events, vec![Event::Ready]);
    assert!(h.c.is_esmtp() && h.c.capabilities().has("CHUNKING"));
    assert_eq!(h.c.capabilities().size(), Some(1_000_000));
    assert_eq!(h.c.stage(), None);
    h.c.quit();
    h.drain();
    assert_eq!(h.written(), "QUIT\r\n");
    assert!(!h.c.can_send());
    h.server("221 bye\r\n");
    assert!(h.closed() && h.c.is_closed());
    assert_eq!(
        h.c.send(message("a@b.test", &["c@d.test"], "x")),
        Err(SendError::Closed)
    );
}

#[test]
fn ehlo_refused_falls_back_to_helo() {
    for code in ["500", "502", "554"] {
        let mut h = Harness::new(config());
        h.server("220 old.test\r\n");
        h.written();
        h.server(&format!("{code} what?\r\n"));
        assert_eq!(h.written(), "HELO out.tern.test\r\n");
        h.server("250 old.test\r\n");
        assert_eq!(h.events, vec![Event::Ready]);
        assert!(!h.c.is_esmtp());
        // No extensions: no parameters, one command at a time, DATA.
        h.send(message(
            "a@b.test",
            &["c@d.test"],
            "Subject: x\r\n\r\nhi\r\n",
        ));
        assert_eq!(h.written(), "MAIL FROM:<a@b.test>\r\n");
        h.server("250 ok\r\n");
        assert_eq!(h.written(), "RCPT TO:<c@d.test>\r\n");
        h.server("250 ok\r\n");
        assert_eq!(h.written(), "DATA\r\n");
        h.server("354 go\r\n");
        assert_eq!(h.written(), "Subject: x\r\n\r\nhi\r\n.\r\n");
        h.server("250 queued\r\n");
        assert_eq!(statuses(&h.outcomes()[0]), vec![Status::Delivered]);
    }
}

#[test]
fn greeting_failures_end_the_connection() {
    let mut h = Harness::new(config());
    h.send(message("a@b.test", &["c@d.test"], "x"));
    h.server("554 5.7.1 no service for you\r\n");
    let f = h.failure().unwrap();
    assert!(f.is_permanent() && !f.local);
    assert_eq!(f.reply.code, 554);
    // The message handed in early shares the connection's fate.
    assert_eq!(statuses(&h.outcomes()[0]), vec![Status::Permanent]);
    assert_eq!(h.written(), "QUIT\r\n");
    assert!(h.closed());

    let mut h = Harness::new(config());
    h.server("421 4.3.2 busy\r\n");
    assert!(!h.failure().unwrap().is_permanent());
    assert!(h.closed());
    // 421 means the server is going: no QUIT.
    assert_eq!(h.written(), "");
}

#[test]
fn ehlo_4xx_is_a_temporary_connection_failure() {
    let mut h = Harness::new(config());
    h.server("220 x\r\n");
    h.server("450 4.3.0 later\r\n");
    let f = h.failure().unwrap();
    assert_eq!((f.reply.code, f.is_permanent()), (450, false));
    assert!(h.closed());
}

#[test]
fn lmtp_uses_lhlo_and_never_helo() {
    let cfg = ClientConfig {
        protocol: Protocol::Lmtp,
        ..config()
    };
    let mut h = Harness::new(cfg);
    h.server("220 lmtp.test LMTP\r\n");
    assert_eq!(h.written(), "LHLO out.tern.test\r\n");
    h.server("500 what\r\n");
    assert!(h.failure().unwrap().is_permanent());
    assert_eq!(h.written(), "QUIT\r\n");
}

fn tls_config(tls: TlsPolicy) -> ClientConfig {
    ClientConfig { tls, ..config() }
}

#[test]
fn opportunistic_starttls_then_ehlo_again() {
    let mut h = Harness::new(tls_config(TlsPolicy::Opportunistic));
    h.server("220 mx\r\n");
    h.written();
    h.server("250-mx\r\n250-STARTTLS\r\n250 PIPELINING\r\n");
    assert_eq!(h.written(), "STARTTLS\r\n");
    h.server("220 2.0.0 go ahead\r\n");
    assert_eq!(h.events, vec![Event::StartTls]);
    assert_eq!(h.c.stage(), None);
    h.c.tls_established();
    h.drain();
    assert!(h.c.is_tls());
    // Capabilities are read anew after TLS (RFC 3207 §4.2).
    assert!(!h.c.capabilities().has("PIPELINING"));
    assert_eq!(h.written(), "EHLO out.tern.test\r\n");
    h.server("250-mx\r\n250 CHUNKING\r\n");
    assert!(h.c.capabilities().has("CHUNKING"));
    assert_eq!(h.events, vec![Event::StartTls, Event::Ready]);
}

#[test]
fn opportunistic_starttls_refused_goes_on_in_plain_text() {
    let mut h = Harness::new(tls_config(TlsPolicy::Opportunistic));
    h.server("220 mx\r\n");
    h.server("250-mx\r\n250 STARTTLS\r\n");
    h.written();
    h.server("454 4.7.0 TLS not available\r\n");
    assert!(matches!(&h.events[0], Event::TlsDeclined(r) if r.code == 454));
    assert_eq!(h.events[1], Event::Ready);
    assert!(!h.c.is_tls());
}

#[test]
fn opportunistic_without_starttls_offered_is_plain() {
    let h = ready_with(tls_config(TlsPolicy::Opportunistic), EHLO_BARE);
    assert_eq!(h.events, vec![Event::Ready]);
}

#[test]
fn required_tls_not_offered_or_refused_fails_temporarily() {
    let mut h = ready_with(tls_config(TlsPolicy::Require), EHLO_ALL);
    let f = h.failure().unwrap();
    assert!(f.local && !f.is_permanent());
    assert!(f.reply.to_string().contains("TLS required but not offered"));
    assert_eq!(h.written(), "QUIT\r\n");
    assert!(h.closed());

    let mut h = ready_with(tls_config(TlsPolicy::Require), "250-mx\r\n250 STARTTLS\r\n");
    h.send(message("a@b.test", &["c@d.test"], "x"));
    h.server("502 no\r\n");
    let f = h.failure().unwrap();
    assert!(f.reply.to_string().contains("STARTTLS was refused"));
    assert_eq!(statuses(&h.outcomes()[0]), vec![Status::Temporary]);
}

#[test]
fn tls_handshake_failure_fails_the_connection() {
    let mut h = ready_with(
        tls_config(TlsPolicy::Opportunistic),
        "250-mx\r\n250 STARTTLS\r\n",
    );
    h.server("220 go\r\n");
    h.c.tls_failed();
    h.drain();
    assert!(
        h.failure()
            .unwrap()
            .reply
            .to_string()
            .contains("TLS handshake failed")
    );
    assert!(h.closed());
}

#[test]
fn plain_text_after_the_starttls_reply_is_an_injection() {
    // CVE-2011-0411 style: a reply smuggled in with the 220.
    let mut h = ready_with(
        tls_config(TlsPolicy::Opportunistic),
        "250-mx\r\n250 STARTTLS\r\n",
    );
    h.written();
    h.c.receive(b"220 go\r\n250 fake\r\n");
    h.drain();
    assert!(!h.events.contains(&Event::StartTls));
    assert!(
        h.failure()
            .unwrap()
            .reply
            .to_string()
            .contains("after its STARTTLS")
    );
    assert!(h.closed());
    // The same octets in a later read are refused too.
    let mut h = ready_with(
        tls_config(TlsPolicy::Opportunistic),
        "250-mx\r\n250 STARTTLS\r\n",
    );
    h.server("220 go\r\n");
    h.server("250 fake\r\n");
    assert!(h.failure().is_some());
}

fn auth_config(allow_plain: bool) -> ClientConfig {
    ClientConfig {
        credentials: Some(Credentials {
            username: "user".into(),
            password: "secret".into(),
        }),
        auth_without_tls: allow_plain,
        ..config()
    }
}

#[test]
fn auth_plain_after_tls() {
    let cfg = ClientConfig {
        tls: TlsPolicy::Require,
        ..auth_config(false)
    };
    let mut h = Harness::new(cfg);
    h.server("220 relay\r\n");
    h.server("250-relay\r\n250-STARTTLS\r\n250 AUTH LOGIN\r\n");
    h.server("220 go\r\n");
    h.c.tls_established();
    h.drain();
    h.written();
    h.server("250-relay\r\n250 AUTH LOGIN PLAIN\r\n");
    // base64("\0user\0secret")
    assert_eq!(h.written(), "AUTH PLAIN AHVzZXIAc2VjcmV0\r\n");
    h.server("235 2.7.0 ok\r\n");
    assert!(h.c.is_authenticated());
    assert_eq!(h.events, vec![Event::StartTls, Event::Ready]);
}

#[test]
fn auth_login_when_plain_is_not_offered() {
    let mut h = ready_with(auth_config(true), "250-relay\r\n250 AUTH=LOGIN\r\n");
    assert_eq!(h.written(), "AUTH LOGIN\r\n");
    h.server("334 VXNlcm5hbWU6\r\n");
    assert_eq!(h.written(), "dXNlcg==\r\n");
    h.server("334 UGFzc3dvcmQ6\r\n");
    assert_eq!(h.written(), "c2VjcmV0\r\n");
    h.server("235 ok\r\n");
    assert_eq!(h.events, vec![Event::Ready]);
}

#[test]
fn auth_failures_are_clear_and_temporary() {
    let mut h = ready_with(auth_config(true), "250-relay\r\n250 AUTH PLAIN\r\n");
    h.send(message("a@b.test", &["c@d.test"], "x"));
    h.server("535 5.7.8 Authentication credentials invalid\r\n");
    let f = h.failure().unwrap();
    assert_eq!((f.reply.code, f.local), (535, false));
    // A credentials fix should not bounce mail.
    let o = &h.outcomes()[0].recipients[0];
    assert_eq!((o.status, o.reply.code), (Status::Temporary, 535));

    // Without TLS and without permission, credentials are not sent.
    let mut h = ready_with(auth_config(false), "250-relay\r\n250 AUTH PLAIN\r\n");
    assert!(
        h.failure()
            .unwrap()
            .reply
            .to_string()
            .contains("without TLS")
    );
    assert_eq!(h.written(), "QUIT\r\n");

    let h = ready_with(auth_config(true), "250-relay\r\n250 AUTH CRAM-MD5\r\n");
    assert!(
        h.failure()
            .unwrap()
            .reply
            .to_string()
            .contains("not offered")
    );
}

#[test]
fn credentials_debug_hides_the_password() {
    let c = auth_config(true).credentials.unwrap();
    assert!(!format!("{c:?}").contains("secret"));
}

#[test]
fn bad_helo_name_is_never_sent() {
    let cfg = ClientConfig {
        helo_name: "x\r\nMAIL FROM:<>".into(),
        ..config()
    };
    let mut h = Harness::new(cfg);
    h.server("220 mx\r\n");
    assert_eq!(h.written(), "QUIT\r\n");
    assert!(h.failure().unwrap().local);
}

#[test]
fn quit_before_setup_waits_for_it() {
    let mut h = Harness::new(config());
    h.c.quit();
    h.drain();
    assert_eq!(h.written(), "");
    h.server("220 mx\r\n");
    h.server(EHLO_BARE);
    assert_eq!(h.written(), "EHLO out.tern.test\r\nQUIT\r\n");
    h.c.eof();
    h.drain();
    assert!(h.closed() && h.failure().is_none());
}

#[test]
fn stage_timeouts_follow_rfc_5321() {
    assert_eq!(Stage::Greeting.timeout().as_secs(), 300);
    assert_eq!(Stage::Mail.timeout().as_secs(), 300);
    assert_eq!(Stage::Rcpt.timeout().as_secs(), 300);
    assert_eq!(Stage::DataInit.timeout().as_secs(), 120);
    assert_eq!(Stage::DataBlock.timeout().as_secs(), 180);
    assert_eq!(Stage::DataEnd.timeout().as_secs(), 600);
    let mut h = Harness::new(config());
    h.c.timeout();
    h.drain();
    let f = h.failure().unwrap();
    assert!(
        f.reply
            .to_string()
            .contains("timeout waiting for the greeting reply")
    );
    assert!(h.closed());
}
