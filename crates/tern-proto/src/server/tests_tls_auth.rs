//! Transcript tests of STARTTLS (RFC 3207), AUTH (RFC 4954) and the
//! submission rule "AUTH before MAIL": what EHLO offers in each state,
//! command injection across the handshake, SASL framing, and the limits a
//! password-guessing client meets. The driver side is simulated: the TLS
//! handshake is a call to `tls_established`, SASL a scripted decision.

use super::tests::{accept, config, count, drain, replies, run_events_with};
use super::*;
use proptest::prelude::*;

/// A submission listener's engine settings: STARTTLS, then AUTH.
fn submission() -> ServerConfig {
    ServerConfig {
        starttls: true,
        auth_mechanisms: ["PLAIN", "LOGIN", "SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"]
            .map(String::from)
            .to_vec()
            .into(),
        require_auth: true,
        ..config()
    }
}

/// base64("\0user\0secret"), an AUTH PLAIN token.
const PLAIN_TOKEN: &str = "AHVzZXIAc2VjcmV0";
const PLAIN_OCTETS: &[u8] = b"\0user\0secret";

/// A session driven by hand: `send` feeds input and returns the events it
/// caused, answering queries with `decide`.
struct Driver<F: FnMut(&Query) -> Decision> {
    s: Session,
    decide: F,
}

impl<F: FnMut(&Query) -> Decision> Driver<F> {
    fn new(cfg: ServerConfig, decide: F) -> Self {
        Self::with(Session::new(cfg), decide)
    }

    fn with(s: Session, decide: F) -> Self {
        let mut d = Driver { s, decide };
        let greeting = d.send(b"");
        assert_eq!(replies(&greeting), "220 mx.test ESMTP Tern\r\n");
        d
    }

    fn send(&mut self, input: &[u8]) -> Vec<Event> {
        self.s.receive(input);
        let mut log = Vec::new();
        drain(&mut self.s, &mut self.decide, &mut log);
        log
    }

    /// The replies `input` caused, as on the wire.
    fn say(&mut self, input: &[u8]) -> String {
        replies(&self.send(input))
    }

    /// Runs STARTTLS (after an EHLO) and the handshake.
    fn start_tls(&mut self) {
        let ev = self.send(b"STARTTLS\r\n");
        assert_eq!(
            ev,
            vec![
                Event::Reply(Reply::enhanced(220, (2, 0, 0), "Ready to start TLS")),
                Event::StartTls
            ]
        );
        self.s.tls_established();
    }
}

/// The driver of a mechanism that takes PLAIN's token, as initial response
/// or after an empty challenge, and knows one user.
fn plain_driver(q: &Query) -> Decision {
    match q {
        Query::Auth {
            mechanism,
            initial: None,
        } if mechanism == "PLAIN" => Decision::AuthChallenge(Vec::new()),
        Query::Auth {
            initial: Some(r), ..
        }
        | Query::AuthResponse(r) => {
            if r.as_bytes() == PLAIN_OCTETS {
                Decision::Accept
            } else {
                Decision::Reject(Reply::enhanced(
                    535,
                    (5, 7, 8),
                    "Authentication credentials invalid",
                ))
            }
        }
        _ => Decision::Accept,
    }
}

/// The EHLO reply's extension keywords (with parameters), one per entry.
fn extensions(wire: &str) -> Vec<String> {
    wire.lines().skip(1).map(|l| l[4..].to_string()).collect()
}

fn offers(wire: &str) -> (bool, Option<String>) {
    let ext = extensions(wire);
    (
        ext.iter().any(|e| e == "STARTTLS"),
        ext.iter().find(|e| e.starts_with("AUTH ")).cloned(),
    )
}

/// A TLS channel without channel binding (TLS 1.2: no RFC 9266 exporter)
/// neither offers nor accepts the -PLUS mechanism.
#[test]
fn plus_needs_a_bindable_channel() {
    let mut d = Driver::new(submission(), plain_driver);
    d.say(b"EHLO c\r\n");
    d.start_tls();
    d.s.set_channel_binding(false);
    let (_, auth) = offers(&d.say(b"EHLO c\r\n"));
    assert_eq!(auth.as_deref(), Some("AUTH PLAIN LOGIN SCRAM-SHA-256"));
    assert!(
        d.say(b"AUTH SCRAM-SHA-256-PLUS\r\n")
            .starts_with("504 5.5.4")
    );
}

#[test]
fn ehlo_offers_depend_on_tls_and_auth() {
    let mut d = Driver::new(submission(), plain_driver);
    // Before TLS: STARTTLS, no AUTH (it waits for TLS).
    assert_eq!(offers(&d.say(b"EHLO c\r\n")), (true, None));
    d.start_tls();
    // After: AUTH with the channel-binding mechanism, no STARTTLS.
    let (tls, auth) = offers(&d.say(b"EHLO c\r\n"));
    assert!(!tls);
    assert_eq!(
        auth.as_deref(),
        Some("AUTH PLAIN LOGIN SCRAM-SHA-256 SCRAM-SHA-256-PLUS")
    );
    // After AUTH: neither.
    let line = format!("AUTH PLAIN {PLAIN_TOKEN}\r\n");
    assert_eq!(
        d.say(line.as_bytes()),
        "235 2.7.0 Authentication successful\r\n"
    );
    assert_eq!(offers(&d.say(b"EHLO c\r\n")), (false, None));

    // AUTH without TLS (a loopback client): offered at once, but not the
    // -PLUS mechanism, which binds to a TLS channel.
    let cfg = ServerConfig {
        auth_without_tls: true,
        ..submission()
    };
    let mut d = Driver::new(cfg, plain_driver);
    let (tls, auth) = offers(&d.say(b"EHLO c\r\n"));
    assert!(tls);
    assert_eq!(auth.as_deref(), Some("AUTH PLAIN LOGIN SCRAM-SHA-256"));

    // Nothing configured: the EHLO reply of before.
    let mut d = Driver::new(config(), accept);
    assert_eq!(offers(&d.say(b"EHLO c\r\n")), (false, None));
    // HELO never lists extensions.
    let mut d = Driver::new(submission(), accept);
    assert_eq!(d.say(b"HELO c\r\n"), "250 mx.test\r\n");
}

#[test]
fn commands_pipelined_after_starttls_never_run() {
    let mut d = Driver::new(submission(), accept);
    // Injected in the same write as STARTTLS (CVE-2011-0411): in plain text
    // before the handshake, they would run as if sent through TLS.
    let ev = d.send(b"EHLO c\r\nSTARTTLS\r\nMAIL FROM:<evil@x>\r\nRCPT TO:<victim@y>\r\n");
    assert_eq!(ev.last(), Some(&Event::StartTls));
    assert!(!d.s.wants_input());
    // More plain text before the handshake: dropped too.
    assert_eq!(d.send(b"RSET\r\nAUTH PLAIN =\r\n"), vec![]);
    assert_eq!(d.s.phase(), Phase::Command);
    d.s.tls_established();
    assert!(d.s.wants_input() && d.s.is_tls());
    // Nothing of it comes out after the handshake: the first command
    // through TLS is the first to be answered, and it must be EHLO.
    let ev = d.send(b"MAIL FROM:<a@b>\r\n");
    assert_eq!(
        replies(&ev),
        "503 5.5.1 Error: send HELO/EHLO first\r\n",
        "{ev:?}"
    );
    let ev = d.send(b"EHLO c\r\n");
    assert_eq!(
        ev[0],
        Event::Query(Query::Helo {
            domain: "c".into(),
            extended: true
        })
    );
    assert_eq!(d.s.helo_domain(), Some("c"));
}

#[test]
fn the_handshake_forgets_the_session_before_it() {
    let cfg = ServerConfig {
        auth_without_tls: true,
        ..submission()
    };
    let mut d = Driver::new(cfg, plain_driver);
    d.say(b"EHLO before\r\n");
    d.say(format!("AUTH PLAIN {PLAIN_TOKEN}\r\n").as_bytes());
    assert!(d.s.is_authenticated());
    d.start_tls();
    // An AUTH in plain text does not survive: RFC 3207 §4.2.
    assert!(!d.s.is_authenticated());
    assert_eq!(d.s.helo_domain(), None);
    assert!(!d.s.used_esmtp());
    d.say(b"EHLO after\r\n");
    assert_eq!(
        d.say(b"MAIL FROM:<a@b>\r\n"),
        "530 5.7.0 Error: authentication required\r\n"
    );
}

#[test]
fn starttls_refusals() {
    let out = |cfg: ServerConfig, input: &[u8]| replies(&run_events_with(cfg, &[input], accept));
    let tail = |s: String| s.lines().last().unwrap_or("").to_string();
    // Not offered at all: as before STARTTLS existed.
    assert_eq!(
        tail(out(config(), b"EHLO c\r\nSTARTTLS\r\n")),
        "502 5.5.1 Error: STARTTLS not implemented"
    );
    assert_eq!(
        tail(out(config(), b"EHLO c\r\nSTARTTLS now\r\n")),
        "502 5.5.1 Error: STARTTLS not implemented"
    );
    for (input, reply) in [
        (
            &b"EHLO c\r\nSTARTTLS now\r\n"[..],
            "501 5.5.4 Syntax: STARTTLS",
        ),
        (b"STARTTLS\r\n", "503 5.5.1 Error: send EHLO first"),
        (
            b"HELO c\r\nSTARTTLS\r\n",
            "503 5.5.1 Error: send EHLO first",
        ),
    ] {
        assert_eq!(tail(out(submission(), input)), reply);
    }
    // Inside a transaction (a submission listener that does not require
    // AUTH, so that MAIL is accepted).
    let open = ServerConfig {
        require_auth: false,
        ..submission()
    };
    assert_eq!(
        tail(out(open, b"EHLO c\r\nMAIL FROM:<a@b>\r\nSTARTTLS\r\n")),
        "503 5.5.1 Error: MAIL transaction in progress"
    );
    // Twice, and on an implicit-TLS session (where it is never offered).
    let mut d = Driver::new(submission(), accept);
    d.say(b"EHLO c\r\n");
    d.start_tls();
    d.say(b"EHLO c\r\n");
    assert_eq!(
        d.say(b"STARTTLS\r\n"),
        "503 5.5.1 Error: TLS already active\r\n"
    );
    for starttls in [true, false] {
        let cfg = ServerConfig {
            starttls,
            ..submission()
        };
        let mut d = Driver::with(Session::over_tls(cfg), accept);
        assert!(d.s.is_tls());
        let (tls, auth) = offers(&d.say(b"EHLO c\r\n"));
        assert!(!tls);
        assert!(auth.is_some_and(|a| a.ends_with("-PLUS")));
        assert_eq!(
            d.say(b"STARTTLS\r\n"),
            "503 5.5.1 Error: TLS already active\r\n"
        );
    }
}

#[test]
fn a_failed_or_timed_out_handshake_closes_without_a_reply() {
    let mut d = Driver::new(submission(), accept);
    d.say(b"EHLO c\r\n");
    d.send(b"STARTTLS\r\n");
    d.s.tls_failed();
    assert_eq!(d.send(b""), vec![Event::Close]);
    assert!(d.s.is_closed());
    // Called again, or established after a failure: nothing happens.
    d.s.tls_failed();
    d.s.tls_established();
    assert_eq!(d.send(b"EHLO c\r\n"), vec![]);

    let mut d = Driver::new(submission(), accept);
    d.say(b"EHLO c\r\n");
    d.send(b"STARTTLS\r\n");
    d.s.timeout();
    assert_eq!(d.send(b""), vec![Event::Close]);
    // tls_established without STARTTLS is ignored.
    let mut d = Driver::new(submission(), accept);
    d.s.tls_established();
    assert!(!d.s.is_tls());
}

#[test]
fn auth_plain_with_and_without_initial_response() {
    let mut d = Driver::new(submission(), plain_driver);
    d.say(b"EHLO c\r\n");
    d.start_tls();
    d.say(b"EHLO c\r\n");
    let ev = d.send(format!("AUTH plain {PLAIN_TOKEN}\r\n").as_bytes());
    assert_eq!(
        ev[0],
        Event::Query(Query::Auth {
            mechanism: "PLAIN".into(),
            initial: Some(SaslData::new(PLAIN_OCTETS.to_vec())),
        })
    );
    assert_eq!(replies(&ev), "235 2.7.0 Authentication successful\r\n");
    assert!(d.s.is_authenticated());
    assert_eq!(d.s.received_protocol(false), "ESMTPSA");

    // Without: an empty challenge ("334 " with its space), then the token.
    let mut d = Driver::new(submission(), plain_driver);
    d.say(b"EHLO c\r\n");
    d.start_tls();
    d.say(b"EHLO c\r\n");
    let ev = d.send(b"AUTH PLAIN\r\n");
    assert_eq!(
        ev[0],
        Event::Query(Query::Auth {
            mechanism: "PLAIN".into(),
            initial: None,
        })
    );
    assert_eq!(replies(&ev), "334 \r\n");
    assert_eq!(d.s.phase(), Phase::Command);
    let ev = d.send(format!("{PLAIN_TOKEN}\r\n").as_bytes());
    assert_eq!(
        ev[0],
        Event::Query(Query::AuthResponse(SaslData::new(PLAIN_OCTETS.to_vec())))
    );
    assert_eq!(replies(&ev), "235 2.7.0 Authentication successful\r\n");

    // `=` is a present, empty initial response (RFC 4954 §4).
    let ev = run_events_with(
        ServerConfig {
            auth_without_tls: true,
            ..submission()
        },
        &[b"EHLO c\r\nAUTH PLAIN =\r\n"],
        plain_driver,
    );
    assert!(ev.contains(&Event::Query(Query::Auth {
        mechanism: "PLAIN".into(),
        initial: Some(SaslData::default()),
    })));
    assert!(replies(&ev).ends_with("535 5.7.8 Authentication credentials invalid\r\n"));
}

#[test]
fn auth_login_takes_two_challenges() {
    let mut step = 0;
    let login = |q: &Query| match q {
        Query::Auth { mechanism, .. } if mechanism == "LOGIN" => {
            Decision::AuthChallenge(b"Username:".to_vec())
        }
        Query::AuthResponse(r) => {
            step += 1;
            match (step, r.as_bytes()) {
                (1, b"user") => Decision::AuthChallenge(b"Password:".to_vec()),
                (2, b"secret") => Decision::Accept,
                _ => Decision::Reject(Reply::enhanced(535, (5, 7, 8), "no")),
            }
        }
        _ => Decision::Accept,
    };
    let cfg = ServerConfig {
        auth_without_tls: true,
        ..submission()
    };
    let ev = run_events_with(
        cfg,
        &[
            b"EHLO c\r\nAUTH LOGIN\r\n",
            b"dXNlcg==\r\n",
            b"c2VjcmV0\r\n",
            b"MAIL FROM:<a@b> AUTH=<>\r\n",
        ],
        login,
    );
    let out = replies(&ev);
    assert!(
        out.ends_with(
            "334 VXNlcm5hbWU6\r\n334 UGFzc3dvcmQ6\r\n235 2.7.0 Authentication successful\r\n\
250 2.1.0 Ok\r\n"
        ),
        "{out}"
    );
    // The MAIL's AUTH= parameter reaches the driver (RFC 4954 §5).
    let mail = ev.iter().find_map(|e| match e {
        Event::Query(Query::Mail { params, .. }) => params.auth.clone(),
        _ => None,
    });
    assert_eq!(mail.as_deref(), Some("<>"));
}

#[test]
fn the_client_ends_an_exchange_with_star_or_bad_base64() {
    let cfg = ServerConfig {
        auth_without_tls: true,
        ..submission()
    };
    let ev = run_events_with(
        cfg,
        &[
            b"EHLO c\r\nAUTH PLAIN\r\n",
            b"*\r\n",
            b"AUTH PLAIN\r\n",
            b"not base64!\r\n",
            b"AUTH PLAIN\r\n",
            b"AHVz\nZXI=\r\n",
            b"AUTH PLAIN AHVzZXIAc2VjcmV0=\r\n",
            format!("AUTH PLAIN {PLAIN_TOKEN}\r\n").as_bytes(),
        ],
        plain_driver,
    );
    let out = replies(&ev);
    assert!(
        out.ends_with(
            "334 \r\n501 5.0.0 Authentication cancelled\r\n\
334 \r\n501 5.5.2 Error: cannot Base64-decode client response\r\n\
334 \r\n501 5.5.2 Error: bare <LF> in authentication exchange\r\n\
500 5.5.2 Error: bare <LF> in command\r\n\
501 5.5.2 Error: cannot Base64-decode client response\r\n\
235 2.7.0 Authentication successful\r\n"
        ),
        "{out}"
    );
    // Only the good token reached the driver: no query for the others.
    assert_eq!(
        count(&ev, |e| matches!(e, Event::Query(Query::AuthResponse(_)))),
        0
    );
}

#[test]
fn sasl_lines_may_be_long_but_not_too_long() {
    // 12288 octets with CRLF (RFC 4954 §4), over a 4096 command limit.
    let cfg = ServerConfig {
        auth_without_tls: true,
        max_command_line: 4096,
        ..submission()
    };
    let b64 = |n: usize| "A".repeat(n);
    let mut sizes = Vec::new();
    let mut d = Driver::new(cfg.clone(), |q: &Query| {
        if let Query::AuthResponse(r)
        | Query::Auth {
            initial: Some(r), ..
        } = q
        {
            sizes.push(r.len());
        }
        match q {
            Query::Auth { initial: None, .. } => Decision::AuthChallenge(b"more".to_vec()),
            Query::Auth { .. } | Query::AuthResponse(_) => {
                Decision::Reject(Reply::enhanced(535, (5, 7, 8), "no"))
            }
            _ => Decision::Accept,
        }
    });
    let bad_base64 = "501 5.5.2 Error: cannot Base64-decode client response\r\n";
    let too_long = "500 5.5.6 Authentication Exchange line is too long\r\n";
    d.say(b"EHLO c\r\n");
    assert_eq!(
        d.say(b"AUTH XOAUTH2\r\n"),
        "504 5.5.4 Error: unsupported authentication mechanism\r\n"
    );
    // The longest base64 that fits, then a line at the limit exactly (read
    // as a line: its base64 is what is wrong), then one octet more.
    assert_eq!(d.say(b"AUTH LOGIN\r\n"), "334 bW9yZQ==\r\n");
    assert_eq!(
        d.say(format!("{}\r\n", b64(12284)).as_bytes()),
        "535 5.7.8 no\r\n"
    );
    assert_eq!(d.say(b"AUTH LOGIN\r\n"), "334 bW9yZQ==\r\n");
    assert_eq!(d.say(format!("{}\r\n", b64(12286)).as_bytes()), bad_base64);
    assert_eq!(d.say(b"AUTH LOGIN\r\n"), "334 bW9yZQ==\r\n");
    let over = format!("{}\r\nNOOP\r\n", b64(12287));
    assert_eq!(
        d.say(over.as_bytes()),
        format!("{too_long}250 2.0.0 Ok\r\n")
    );
    // Over, arriving in pieces: answered once the limit is passed, the rest
    // skipped unbuffered, and the session goes on.
    assert_eq!(d.say(b"AUTH LOGIN\r\n"), "334 bW9yZQ==\r\n");
    assert_eq!(d.say(b64(8000).as_bytes()), "");
    assert_eq!(d.say(b64(8000).as_bytes()), too_long);
    assert!(d.s.input.capacity() <= 16 * 1024);
    assert_eq!(d.say(b64(30_000).as_bytes()), "");
    assert_eq!(d.say(b"\r\nNOOP\r\n"), "250 2.0.0 Ok\r\n");
    // The AUTH command line itself, with its initial response: the same
    // limit ("AUTH PLAIN " is 11 octets).
    assert_eq!(
        d.say(format!("AUTH PLAIN {}\r\n", b64(12272)).as_bytes()),
        "535 5.7.8 no\r\n"
    );
    assert_eq!(
        d.say(format!("AUTH PLAIN {}\r\n", b64(12275)).as_bytes()),
        bad_base64
    );
    assert_eq!(
        d.say(format!("AUTH PLAIN {}\r\nNOOP\r\n", b64(12276)).as_bytes()),
        format!("{too_long}250 2.0.0 Ok\r\n")
    );
    drop(d);
    assert_eq!(sizes, vec![12284 / 4 * 3, 12272 / 4 * 3]);
    // Other commands keep their limit.
    let mut d = Driver::new(cfg, accept);
    assert_eq!(
        d.say(format!("NOOP {}\r\n", b64(5000)).as_bytes()),
        "500 5.5.2 Error: line too long\r\n"
    );
}

#[test]
fn auth_refusals() {
    let tail = |cfg: ServerConfig, input: &[u8]| {
        let r = replies(&run_events_with(cfg, &[input], plain_driver));
        r.lines().last().unwrap_or("").to_string()
    };
    let loopback = ServerConfig {
        auth_without_tls: true,
        ..submission()
    };
    let plain_only = ServerConfig {
        starttls: false,
        ..submission()
    };
    let auth = format!("AUTH PLAIN {PLAIN_TOKEN}\r\n");
    let twice = format!("EHLO c\r\n{auth}{auth}");
    let cases: [(&ServerConfig, &[u8], &str); 13] = [
        // Not configured: as before AUTH existed.
        (
            &config(),
            b"EHLO c\r\nAUTH PLAIN =\r\n",
            "502 5.5.1 Error: AUTH not implemented",
        ),
        (
            &config(),
            b"EHLO c\r\nAUTH\r\n",
            "502 5.5.1 Error: AUTH not implemented",
        ),
        (
            &submission(),
            b"AUTH PLAIN =\r\n",
            "503 5.5.1 Error: send EHLO first",
        ),
        (
            &submission(),
            b"HELO c\r\nAUTH PLAIN =\r\n",
            "503 5.5.1 Error: send EHLO first",
        ),
        (
            &submission(),
            b"EHLO c\r\nAUTH\r\n",
            "501 5.5.4 Syntax: AUTH mechanism [initial-response]",
        ),
        // Offered only over TLS, and TLS can be had.
        (
            &submission(),
            b"EHLO c\r\nAUTH PLAIN =\r\n",
            "538 5.7.11 Error: encryption required for requested authentication mechanism",
        ),
        // An unknown mechanism is unknown with or without TLS.
        (
            &submission(),
            b"EHLO c\r\nAUTH CRAM-MD5\r\n",
            "504 5.5.4 Error: unsupported authentication mechanism",
        ),
        // Offered only over TLS, and TLS cannot be had here.
        (
            &plain_only,
            b"EHLO c\r\nAUTH PLAIN =\r\n",
            "503 5.5.1 Error: authentication not enabled",
        ),
        (
            &loopback,
            b"EHLO c\r\nAUTH CRAM-MD5\r\n",
            "504 5.5.4 Error: unsupported authentication mechanism",
        ),
        // Channel binding needs TLS even where AUTH is offered without.
        (
            &loopback,
            b"EHLO c\r\nAUTH SCRAM-SHA-256-PLUS\r\n",
            "538 5.7.11 Error: encryption required for requested authentication mechanism",
        ),
        (
            &loopback,
            b"EHLO c\r\nAUTH PLAIN AHVzZXIAc2VjcmV0=\r\n",
            "501 5.5.2 Error: cannot Base64-decode client response",
        ),
        (
            &loopback,
            twice.as_bytes(),
            "503 5.5.1 Error: already authenticated",
        ),
        (
            &ServerConfig {
                require_auth: false,
                ..loopback.clone()
            },
            b"EHLO c\r\nMAIL FROM:<a@b>\r\nAUTH PLAIN =\r\n",
            "503 5.5.1 Error: MAIL transaction in progress",
        ),
    ];
    for (cfg, input, reply) in cases {
        assert_eq!(
            tail(cfg.clone(), input),
            reply,
            "{}",
            String::from_utf8_lossy(input)
        );
    }
}

#[test]
fn submission_needs_auth_before_mail() {
    let mut d = Driver::new(submission(), plain_driver);
    d.say(b"EHLO c\r\n");
    // AUTH itself waits for TLS here: RFC 3207 §4's reply says what to do.
    assert_eq!(
        d.say(b"MAIL FROM:<a@b>\r\n"),
        "530 5.7.0 Must issue a STARTTLS command first\r\n"
    );
    d.start_tls();
    d.say(b"EHLO c\r\n");
    assert_eq!(
        d.say(b"MAIL FROM:<a@b>\r\n"),
        "530 5.7.0 Error: authentication required\r\n"
    );
    assert_eq!(
        d.say(b"AUTH PLAIN AHVzZXIAd3Jvbmc=\r\nMAIL FROM:<a@b>\r\n"),
        "535 5.7.8 Authentication credentials invalid\r\n530 5.7.0 Error: authentication required\r\n"
    );
    // Pipelined after a good AUTH, MAIL is judged after it.
    let ev = d.send(format!("AUTH PLAIN {PLAIN_TOKEN}\r\nMAIL FROM:<a@b>\r\n").as_bytes());
    assert_eq!(
        replies(&ev),
        "235 2.7.0 Authentication successful\r\n250 2.1.0 Ok\r\n"
    );
    assert_eq!(
        count(&ev, |e| matches!(e, Event::Query(Query::Mail { .. }))),
        1
    );
    // Without require_auth, MAIL needs no AUTH (port 25).
    let ev = run_events_with(
        ServerConfig {
            require_auth: false,
            ..submission()
        },
        &[b"EHLO c\r\nMAIL FROM:<a@b>\r\n"],
        accept,
    );
    assert!(replies(&ev).ends_with("250 2.1.0 Ok\r\n"));
}

#[test]
fn guessing_passwords_meets_the_limits() {
    let wrong = || {
        let mut input = b"EHLO c\r\n".to_vec();
        for _ in 0..50 {
            input.extend_from_slice(b"AUTH PLAIN AHVzZXIAd3Jvbmc=\r\n");
        }
        input
    };
    // Each refusal is an error.
    let cfg = ServerConfig {
        auth_without_tls: true,
        max_errors: 5,
        ..submission()
    };
    let ev = run_events_with(cfg, &[&wrong()], plain_driver);
    let out = replies(&ev);
    assert_eq!(out.matches("535 5.7.8").count(), 5, "{out}");
    assert!(out.ends_with("421 4.7.0 mx.test Error: too many errors\r\n"));
    assert_eq!(ev.last(), Some(&Event::Close));
    // With no error limit, AUTH still counts as a command without mail.
    let cfg = ServerConfig {
        auth_without_tls: true,
        max_errors: 0,
        max_junk_commands: 10,
        ..submission()
    };
    let ev = run_events_with(cfg, &[&wrong()], plain_driver);
    let out = replies(&ev);
    assert_eq!(out.matches("535 5.7.8").count(), 10, "{out}");
    assert!(out.ends_with("421 4.7.0 mx.test Error: too many commands without mail\r\n"));
    // Cancelling each exchange is no way around it.
    let cfg = ServerConfig {
        auth_without_tls: true,
        max_errors: 0,
        max_junk_commands: 3,
        ..submission()
    };
    let ev = run_events_with(
        cfg,
        &[b"EHLO c\r\n", &b"AUTH PLAIN\r\n*\r\n".repeat(10)],
        plain_driver,
    );
    assert!(replies(&ev).ends_with("421 4.7.0 mx.test Error: too many commands without mail\r\n"));
}

#[test]
fn driver_replies_and_misuse() {
    let cfg = ServerConfig {
        auth_without_tls: true,
        ..submission()
    };
    // A custom success reply, and a temporary failure.
    let mut d =
        Driver::new(cfg.clone(), |q: &Query| match q {
            Query::Auth { mechanism, .. } if mechanism == "LOGIN" => Decision::Reject(
                Reply::enhanced(454, (4, 7, 0), "Temporary authentication failure"),
            ),
            Query::Auth { .. } => {
                Decision::AcceptWith(Reply::enhanced(235, (2, 7, 0), "Welcome, user"))
            }
            _ => Decision::Accept,
        });
    d.say(b"EHLO c\r\n");
    assert_eq!(
        d.say(b"AUTH LOGIN\r\n"),
        "454 4.7.0 Temporary authentication failure\r\n"
    );
    assert!(!d.s.is_authenticated());
    assert_eq!(d.say(b"AUTH PLAIN =\r\n"), "235 2.7.0 Welcome, user\r\n");
    assert!(d.s.is_authenticated());
    // A challenge is no answer to MAIL: refused, never taken as a yes.
    let open = ServerConfig {
        require_auth: false,
        ..cfg.clone()
    };
    let ev = run_events_with(open, &[b"EHLO c\r\nMAIL FROM:<a@b>\r\n"], |q| match q {
        Query::Mail { .. } => Decision::AuthChallenge(b"x".to_vec()),
        _ => Decision::Accept,
    });
    assert!(replies(&ev).ends_with("SCRAM-SHA-256\r\n451 4.3.0 Error: internal server error\r\n"));
    // Disconnect in the middle of an exchange.
    let ev = run_events_with(
        cfg,
        &[b"EHLO c\r\nAUTH PLAIN\r\n", b"AAAA\r\n"],
        |q| match q {
            Query::AuthResponse(_) => {
                Decision::Disconnect(Reply::enhanced(421, (4, 7, 0), "Too many failures"))
            }
            Query::Auth { .. } => Decision::AuthChallenge(Vec::new()),
            _ => Decision::Accept,
        },
    );
    assert!(replies(&ev).ends_with("334 \r\n421 4.7.0 Too many failures\r\n"));
    assert_eq!(ev.last(), Some(&Event::Close));
}

#[test]
fn secrets_stay_out_of_debug_output() {
    let cfg = ServerConfig {
        auth_without_tls: true,
        ..submission()
    };
    let mut s = Session::new(cfg);
    let mut log = Vec::new();
    drain(&mut s, &mut accept, &mut log);
    s.receive(b"EHLO c\r\n");
    drain(&mut s, &mut accept, &mut log);
    s.receive(format!("AUTH PLAIN {PLAIN_TOKEN}\r\nAUTH PLAIN {PLAIN_TOKEN}\r\n").as_bytes());
    // The query is out, the second line still buffered.
    let q = s.next_event();
    let shown = format!("{q:?} {s:?}");
    assert!(matches!(q, Some(Event::Query(Query::Auth { .. }))));
    for secret in ["secret", PLAIN_TOKEN, "115, 101, 99"] {
        assert!(!shown.contains(secret), "{shown}");
    }
    assert!(shown.contains("SaslData(<redacted>)"), "{shown}");
    let r = format!(
        "{:?}",
        Query::AuthResponse(SaslData::new(b"hunter2".to_vec()))
    );
    assert_eq!(r, "AuthResponse(SaslData(<redacted>))");
}

#[test]
fn received_protocol_names() {
    let cfg = ServerConfig {
        auth_without_tls: true,
        ..submission()
    };
    let mut d = Driver::new(cfg.clone(), plain_driver);
    d.say(b"HELO c\r\n");
    assert_eq!(d.s.received_protocol(false), "SMTP");
    d.say(b"EHLO c\r\n");
    assert_eq!(d.s.received_protocol(false), "ESMTP");
    assert_eq!(d.s.received_protocol(true), "UTF8SMTP");
    d.say(format!("AUTH PLAIN {PLAIN_TOKEN}\r\n").as_bytes());
    assert_eq!(d.s.received_protocol(false), "ESMTPA");
    let mut d = Driver::with(Session::over_tls(cfg), plain_driver);
    d.say(b"EHLO c\r\n");
    assert_eq!(d.s.received_protocol(false), "ESMTPS");
    d.say(format!("AUTH PLAIN {PLAIN_TOKEN}\r\n").as_bytes());
    assert_eq!(d.s.received_protocol(false), "ESMTPSA");
    assert_eq!(d.s.received_protocol(true), "UTF8SMTPSA");
}

#[test]
fn idle_session_stays_small_with_auth_configured() {
    let s = Session::new(submission());
    assert!(
        std::mem::size_of_val(&s) < 1024,
        "{}",
        std::mem::size_of_val(&s)
    );
    // The mechanism list is shared, not copied, per session.
    let cfg = submission();
    let copy = cfg.clone();
    assert!(std::sync::Arc::ptr_eq(
        &cfg.auth_mechanisms,
        &copy.auth_mechanisms
    ));
    // And a config without AUTH allocates no list at all: the default
    // empty one is a shared static.
    assert!(std::sync::Arc::ptr_eq(
        &ServerConfig::default().auth_mechanisms,
        &ServerConfig::default().auth_mechanisms
    ));
}

/// Commands an attacker might inject after STARTTLS, and raw bytes.
fn arb_injected() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..30),
        prop::sample::select(vec![
            b"MAIL FROM:<evil@x>\r\n".to_vec(),
            b"RCPT TO:<victim@y>\r\n".to_vec(),
            b"DATA\r\n".to_vec(),
            b"EHLO evil\r\n".to_vec(),
            b"STARTTLS\r\n".to_vec(),
            b"AUTH PLAIN AHVzZXIAc2VjcmV0\r\n".to_vec(),
            b"QUIT\r\n".to_vec(),
            b"\r\n".to_vec(),
            b"\n".to_vec(),
        ]),
    ];
    prop::collection::vec(piece, 0..8).prop_map(|v| v.concat())
}

proptest! {
    /// Whatever follows STARTTLS in the same input, however the input is
    /// split, and whatever more arrives before the handshake: nothing but
    /// the 220 and StartTls comes out before `tls_established`, and after
    /// it the first command through TLS is the first one answered.
    #[test]
    fn nothing_after_starttls_runs(
        injected in arb_injected(),
        later in arb_injected(),
        cuts in prop::collection::vec(0usize..200, 0..4),
        auth_without_tls in any::<bool>(),
    ) {
        let cfg = ServerConfig { auth_without_tls, ..submission() };
        let mut s = Session::new(cfg);
        let mut log = Vec::new();
        drain(&mut s, &mut accept, &mut log);
        let mut input = b"EHLO c\r\nSTARTTLS\r\n".to_vec();
        let starttls_end = input.len();
        input.extend_from_slice(&injected);
        // Cut points inside the STARTTLS line or before it; the last piece
        // always carries the end of the STARTTLS line and the injection.
        let mut points: Vec<usize> = cuts.iter().map(|c| c % starttls_end).collect();
        points.sort_unstable();
        points.dedup();
        let mut pieces = Vec::new();
        let mut at = 0;
        for p in points {
            pieces.push(&input[at..p]);
            at = p;
        }
        pieces.push(&input[at..]);
        for piece in pieces {
            s.receive(piece);
            drain(&mut s, &mut accept, &mut log);
        }
        let tls_at = log.iter().position(|e| *e == Event::StartTls);
        prop_assert!(tls_at.is_some(), "{:?}", log);
        let tls_at = tls_at.unwrap_or(0);
        prop_assert_eq!(
            &log[tls_at - 1],
            &Event::Reply(Reply::enhanced(220, (2, 0, 0), "Ready to start TLS"))
        );
        prop_assert_eq!(tls_at + 1, log.len(), "{:?}", &log[tls_at..]);
        s.receive(&later);
        drain(&mut s, &mut accept, &mut log);
        prop_assert_eq!(tls_at + 1, log.len());
        prop_assert!(!s.wants_input());
        s.tls_established();
        drain(&mut s, &mut accept, &mut log);
        prop_assert_eq!(tls_at + 1, log.len());
        s.receive(b"EHLO after\r\nQUIT\r\n");
        drain(&mut s, &mut accept, &mut log);
        let after = &log[tls_at + 1..];
        prop_assert_eq!(
            &after[0],
            &Event::Query(Query::Helo { domain: "after".into(), extended: true })
        );
        prop_assert!(matches!(&after[1], Event::Reply(r) if r.code == 250));
        prop_assert_eq!(&after[2..], &[
            Event::Reply(Reply::enhanced(221, (2, 0, 0), "Bye")),
            Event::Close,
        ][..]);
    }
}

fn arb_auth_chunk() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..30),
        prop::sample::select(vec![
            b"EHLO c\r\n".to_vec(),
            b"HELO c\r\n".to_vec(),
            b"STARTTLS\r\n".to_vec(),
            b"STARTTLS x\r\n".to_vec(),
            b"AUTH PLAIN\r\n".to_vec(),
            b"AUTH PLAIN =\r\n".to_vec(),
            b"AUTH PLAIN AHVzZXIAc2VjcmV0\r\n".to_vec(),
            b"AUTH LOGIN\r\n".to_vec(),
            b"AUTH SCRAM-SHA-256-PLUS biws\r\n".to_vec(),
            b"AUTH XOAUTH2\r\n".to_vec(),
            b"dXNlcg==\r\n".to_vec(),
            b"*\r\n".to_vec(),
            b"!!\r\n".to_vec(),
            b"MAIL FROM:<a@b> AUTH=<>\r\n".to_vec(),
            b"RCPT TO:<x@b>\r\n".to_vec(),
            b"DATA\r\n".to_vec(),
            b"x\r\n.\r\n".to_vec(),
            b"RSET\r\n".to_vec(),
            b"QUIT\r\n".to_vec(),
            b"\n".to_vec(),
        ]),
    ]
}

proptest! {
    /// Any input, any driver answers, any configuration: the SMTP side of
    /// AUTH and STARTTLS keeps its rules.
    #[test]
    fn auth_and_starttls_keep_their_rules(
        chunks in prop::collection::vec(arb_auth_chunk(), 0..30),
        verdicts in prop::collection::vec(0u8..7, 1..8),
        starttls in any::<bool>(),
        auth_without_tls in any::<bool>(),
        require_auth in any::<bool>(),
        implicit in any::<bool>(),
        handshake_fails in any::<bool>(),
    ) {
        let cfg = ServerConfig {
            starttls,
            auth_without_tls,
            require_auth,
            max_errors: 10,
            max_junk_commands: 20,
            ..submission()
        };
        let mut s = if implicit { Session::over_tls(cfg) } else { Session::new(cfg) };
        let mut turn = 0;
        let mut last_reply = 0;
        let mut challenged = false;
        let mut closed = false;
        let mut handshake = false;
        for c in std::iter::once(&Vec::new()).chain(&chunks) {
            s.receive(c);
            while let Some(e) = s.next_event() {
                prop_assert!(!closed, "event after Close: {:?}", e);
                match &e {
                    Event::Reply(r) => {
                        prop_assert!((200..600).contains(&r.code));
                        // A 334 only answers the driver's challenge.
                        prop_assert_eq!(r.code == 334, challenged);
                        challenged = false;
                        last_reply = r.code;
                    }
                    Event::StartTls => {
                        prop_assert_eq!(last_reply, 220);
                        handshake = true;
                    }
                    Event::Close => closed = true,
                    Event::Query(q) => {
                        match q {
                            Query::Mail { .. } => {
                                prop_assert!(!require_auth || s.is_authenticated());
                            }
                            Query::Auth { mechanism, .. } => {
                                prop_assert!(!s.is_authenticated());
                                prop_assert!(s.is_tls() || auth_without_tls);
                                prop_assert!(s.is_tls() || !mechanism.ends_with("-PLUS"));
                            }
                            Query::AuthResponse(_) => prop_assert_eq!(last_reply, 334),
                            _ => {}
                        }
                        turn += 1;
                        let auth = matches!(q, Query::Auth { .. } | Query::AuthResponse(_));
                        let d = match (auth, verdicts[turn % verdicts.len()]) {
                            (true, 0) => Decision::AuthChallenge(b"more".to_vec()),
                            (true, 1) => Decision::AuthChallenge(Vec::new()),
                            (_, 3) => Decision::Reject(Reply::enhanced(535, (5, 7, 8), "no")),
                            (_, 4) => Decision::Reject(Reply::enhanced(454, (4, 7, 0), "later")),
                            (_, 5) => Decision::Disconnect(Reply::enhanced(421, (4, 7, 0), "bye")),
                            _ => Decision::Accept,
                        };
                        challenged = matches!(d, Decision::AuthChallenge(_));
                        s.decide(d);
                    }
                    _ => {}
                }
            }
            if handshake {
                prop_assert!(!s.wants_input());
                handshake = false;
                if handshake_fails {
                    s.tls_failed();
                } else {
                    s.tls_established();
                    prop_assert!(s.is_tls() && !s.is_authenticated());
                }
                continue;
            }
            prop_assert!(s.is_closed() || s.wants_input());
            prop_assert!(s.input.len() <= 12288 + 40);
        }
    }
}
