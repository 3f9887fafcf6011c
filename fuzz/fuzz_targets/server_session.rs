//! Fuzz target: arbitrary bytes into a `Session`, split at fuzzer-chosen
//! points, with decisions derived from the input.
//!
//! Input layout: byte 0 = config flags, bytes 1..9 = decision and split
//! seeds, the rest = what the peer sends.
//!
//! Invariants checked: no panic; every reply is well-formed (parses back to
//! the same code, 200..=599); nothing follows Close; a query is the only
//! way the session waits; `eof()` always ends in Close; no EndOfData
//! without a Data query before it; no message content carries a NUL; the
//! forged-results filter the driver runs over content never adds octets.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_proto::headers::ForgedResultsFilter;
use tern_proto::{
    BareLfPolicy, Decision, EnhancedCode, Event, NulPolicy, Query, Reply, ServerConfig, Session,
};

struct Checker {
    closed: bool,
    data_queries: usize,
    end_queries: usize,
    /// The current message's content through the driver's header filter.
    filter: ForgedResultsFilter,
    content_in: usize,
    content_out: usize,
}

impl Checker {
    fn check(&mut self, e: &Event) {
        assert!(!self.closed, "event after Close: {e:?}");
        match e {
            Event::Reply(r) => {
                assert!((200..600).contains(&r.code), "bad code {r:?}");
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
            Event::MessageAborted => self.new_message(),
            Event::Close => self.closed = true,
            _ => {}
        }
    }

    fn new_message(&mut self) {
        self.filter = ForgedResultsFilter::new("mx.fuzz");
        self.content_in = 0;
        self.content_out = 0;
    }
}

fn decision(seed: u8, q: &Query) -> Decision {
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
    while let Some(e) = s.next_event() {
        c.check(&e);
        if let Event::Query(q) = &e {
            *turn += 1;
            s.decide(decision(seeds[*turn % seeds.len()], q));
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
        max_text_line: if small { 40 } else { 1000 },
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
        ..ServerConfig::default()
    };
    let mut s = Session::new(cfg);
    let mut c = Checker {
        closed: false,
        data_queries: 0,
        end_queries: 0,
        filter: ForgedResultsFilter::new("mx.fuzz"),
        content_in: 0,
        content_out: 0,
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
