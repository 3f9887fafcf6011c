//! Fuzz target: arbitrary bytes into a `Session`, split at fuzzer-chosen
//! points, with decisions derived from the input.
//!
//! Input layout: byte 0 = config flags, bytes 1..9 = decision and split
//! seeds, the rest = what the peer sends. The driver side of STARTTLS and
//! AUTH is simulated: the handshake succeeds (or fails) as soon as
//! `StartTls` comes, and a SASL exchange gets up to three challenges, then
//! Accept, Reject or Disconnect, all from the seeds.
//!
//! Invariants checked: no panic; every reply is well-formed (parses back to
//! the same code, 200..=599); nothing follows Close; a query or a TLS
//! handshake is the only way the session waits, and nothing comes out
//! during a handshake; `eof()` always ends in Close; no EndOfData without a
//! Data query before it; no message content carries a NUL; the
//! forged-results filter the driver runs over content never adds octets; a
//! 334 only carries the driver's challenge and only a 334 is answered by
//! `AuthResponse`; AUTH never runs twice, nor without TLS unless allowed,
//! nor with a -PLUS mechanism without TLS; MAIL reaches the driver only
//! authenticated when AUTH is required; STARTTLS only once, and only with
//! its 220 right before.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_proto::headers::ForgedResultsFilter;
use tern_proto::{
    BareLfPolicy, Decision, EnhancedCode, Event, NulPolicy, Query, Reply, ServerConfig, Session,
};

const MECHANISMS: [&str; 3] = ["PLAIN", "LOGIN", "SCRAM-SHA-256-PLUS"];

struct Checker {
    closed: bool,
    data_queries: usize,
    end_queries: usize,
    /// The current message's content through the driver's header filter.
    filter: ForgedResultsFilter,
    content_in: usize,
    content_out: usize,
    require_auth: bool,
    auth_without_tls: bool,
    /// The last reply's code.
    last_reply: u16,
    /// The last decision was a challenge: the next event is its 334.
    challenged: bool,
    /// Challenges given in the current SASL exchange.
    steps: usize,
    /// `StartTls` came; the driver runs the handshake once the session
    /// stops giving events.
    handshake: bool,
    handshakes: usize,
}

impl Checker {
    fn check(&mut self, s: &Session, e: &Event) {
        assert!(!self.closed, "event after Close: {e:?}");
        assert!(!self.handshake, "event during the TLS handshake: {e:?}");
        match e {
            Event::Reply(r) => {
                assert!((200..600).contains(&r.code), "bad code {r:?}");
                assert_eq!(r.code == 334, self.challenged, "334 out of turn: {r:?}");
                self.challenged = false;
                self.last_reply = r.code;
                let bytes = r.to_bytes();
                let (back, n) = Reply::parse(&bytes).expect("own reply must parse");
                assert_eq!(n, bytes.len());
                assert_eq!(back.code, r.code);
                assert!(bytes.ends_with(b"\r\n"));
            }
            Event::Query(Query::Data) => self.data_queries += 1,
            Event::Query(Query::EndOfData) => {
                self.end_queries += 1;
                assert!(self.end_queries <= self.data_queries);
                let mut rest = Vec::new();
                self.filter.finish(&mut rest);
                self.content_out += rest.len();
                assert!(self.content_out <= self.content_in, "the filter added octets");
                self.new_message();
            }
            Event::Body(b) => {
                assert!(!b.contains(&0), "NUL in content");
                let mut scratch = Vec::new();
                self.content_in += b.len();
                self.content_out += self.filter.feed(b, &mut scratch).len();
            }
            Event::MessageAborted(_) => self.new_message(),
            Event::Close => self.closed = true,
            Event::StartTls => {
                assert_eq!(self.last_reply, 220);
                assert!(!s.is_tls() && !s.wants_input());
                self.handshake = true;
                self.handshakes += 1;
                assert_eq!(self.handshakes, 1, "STARTTLS twice");
            }
            Event::Query(Query::Mail { .. }) => {
                assert!(
                    !self.require_auth || s.is_authenticated(),
                    "MAIL without AUTH"
                );
            }
            Event::Query(Query::Auth { mechanism, .. }) => {
                assert!(!s.is_authenticated(), "AUTH twice");
                assert!(s.is_tls() || self.auth_without_tls, "AUTH without TLS");
                assert!(
                    s.is_tls() || !mechanism.ends_with("-PLUS"),
                    "-PLUS without TLS"
                );
                assert!(MECHANISMS.contains(&mechanism.as_str()));
                self.steps = 0;
            }
            Event::Query(Query::AuthResponse(_)) => assert_eq!(self.last_reply, 334),
            _ => {}
        }
    }

    fn new_message(&mut self) {
        self.filter = ForgedResultsFilter::new("mx.fuzz");
        self.content_in = 0;
        self.content_out = 0;
    }
}

fn decision(seed: u8, q: &Query, steps: &mut usize) -> Decision {
    if matches!(q, Query::Auth { .. } | Query::AuthResponse(_)) {
        // Up to three challenges (SCRAM takes two, LOGIN two), then a verdict.
        if *steps < usize::from(seed % 4) {
            *steps += 1;
            return Decision::AuthChallenge(vec![seed; usize::from(seed % 5)]);
        }
        return match seed % 5 {
            0 | 1 => Decision::Accept,
            2 => Decision::Reject(Reply::new(535, Some(EnhancedCode(5, 7, 8)), "no")),
            3 => Decision::Reject(Reply::new(454, Some(EnhancedCode(4, 7, 0)), "later")),
            _ => Decision::Disconnect(Reply::new(421, Some(EnhancedCode(4, 7, 0)), "bye")),
        };
    }
    match (seed % 8, q) {
        (0..=3, _) => Decision::Accept,
        (4, _) => Decision::Reject(Reply::new(550, Some(EnhancedCode(5, 7, 1)), "no")),
        (5, _) => Decision::Reject(Reply::new(451, Some(EnhancedCode(4, 3, 0)), "later")),
        (6, Query::EndOfData) => Decision::Queued {
            queue_id: "Q".into(),
        },
        (6, _) => Decision::AcceptWith(Reply::new(250, Some(EnhancedCode(2, 0, 0)), "fine")),
        _ => Decision::Disconnect(Reply::new(421, Some(EnhancedCode(4, 7, 0)), "bye")),
    }
}

fn drain(s: &mut Session, c: &mut Checker, seeds: &[u8], turn: &mut usize) {
    loop {
        while let Some(e) = s.next_event() {
            c.check(s, &e);
            if let Event::Query(q) = &e {
                *turn += 1;
                let d = decision(seeds[*turn % seeds.len()], q, &mut c.steps);
                c.challenged = matches!(d, Decision::AuthChallenge(_));
                s.decide(d);
            }
        }
        if !c.handshake {
            break;
        }
        c.handshake = false;
        *turn += 1;
        if seeds[*turn % seeds.len()] % 16 == 15 {
            s.tls_failed();
        } else {
            s.tls_established();
            assert!(s.is_tls() && !s.is_authenticated() && s.helo_domain().is_none());
        }
    }
    assert!(
        s.is_closed() || s.wants_input(),
        "session waits without a query"
    );
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 9 {
        return;
    }
    let (head, input) = data.split_at(9);
    let flags = head[0];
    let seeds = &head[1..9];
    let small = flags & 2 != 0;
    let cfg = ServerConfig {
        hostname: "mx.fuzz".into(),
        bare_lf: if flags & 1 != 0 {
            BareLfPolicy::Normalize
        } else {
            BareLfPolicy::Reject
        },
        max_command_line: if small { 512 } else { 4096 },
        // 0: no line limit, the default (lines of any length are content).
        max_text_line: if small { 40 } else { 0 },
        max_message_size: if small { 200 } else { 0 },
        max_recipients: if small { 2 } else { 100 },
        max_errors: if flags & 4 != 0 { 0 } else { 20 },
        max_received_headers: if small { 1 } else { 50 },
        max_junk_commands: if small { 3 } else { 100 },
        nul: if flags & 16 != 0 {
            NulPolicy::Strip
        } else {
            NulPolicy::Reject
        },
        starttls: flags & 32 != 0,
        auth_mechanisms: if flags & 64 != 0 {
            MECHANISMS.map(String::from).to_vec().into()
        } else {
            Vec::new().into()
        },
        auth_without_tls: seeds[7] & 1 != 0,
        require_auth: flags & 128 != 0,
        ..ServerConfig::default()
    };
    let (require_auth, auth_without_tls) = (cfg.require_auth, cfg.auth_without_tls);
    let mut s = if seeds[7] & 2 != 0 {
        Session::over_tls(cfg)
    } else {
        Session::new(cfg)
    };
    let mut c = Checker {
        closed: false,
        data_queries: 0,
        end_queries: 0,
        filter: ForgedResultsFilter::new("mx.fuzz"),
        content_in: 0,
        content_out: 0,
        require_auth,
        auth_without_tls,
        last_reply: 0,
        challenged: false,
        steps: 0,
        handshake: false,
        handshakes: 0,
    };
    let mut turn = 0;
    drain(&mut s, &mut c, seeds, &mut turn);
    let mut pos = 0;
    let mut k = 0;
    while pos < input.len() {
        let len = usize::from(seeds[k % seeds.len()]).max(1);
        k += 1;
        let end = (pos + len).min(input.len());
        s.receive(&input[pos..end]);
        pos = end;
        drain(&mut s, &mut c, seeds, &mut turn);
    }
    if flags & 8 != 0 {
        s.timeout();
    }
    s.eof();
    drain(&mut s, &mut c, seeds, &mut turn);
    assert!(c.closed, "eof must end in Close");
});
