//! Fuzz target: arbitrary server bytes into a `client::Client` carrying
//! messages, split at fuzzer-chosen points.
//!
//! Input layout: byte 0 = config flags, byte 1 = message flags, bytes 2..10
//! = split seeds, the rest = what the server sends.
//!
//! Invariants checked: no panic; nothing follows Close; every message handed
//! in gets exactly one Outcome with one entry per recipient, whose replies
//! are sanitised (printable ASCII, bounded) and carry a code of 200..=599;
//! no write holds a bare CR or LF; `eof()` always ends in Close.
#![no_main]


use libfuzzer_sys::fuzz_target;
use tern_proto::client::{
    Client, ClientConfig, Credentials, Event, Message, Protocol, Recipient, TlsPolicy, sanitize,
};
use tern_proto::{MailParams, RcptParams, parse_forward_path, parse_reverse_path};

const RECIPIENTS: [&str; 4] = [
    "<a@x.test>",
    "<b@x.test>",
    "<j\u{f6}rg@x.test>",
    "<d@x.test>",
];

fn message(flags: u8) -> Message {
    let n = 1 + usize::from(flags & 3);
    let mut content: Vec<u8> = match flags >> 2 & 3 {
        0 => b"Subject: t\r\n\r\nbody\r\n".to_vec(),
        1 => b"Subject: t\r\n\r\n.dot\r\n.\r\nbare\nlf\r".to_vec(),
        2 => b"Subject: caf\xc3\xa9\r\n\r\n8bit \xe9\r\n".to_vec(),
        _ => Vec::new(),
    };
    if flags & 3 == 3 {
        // Lines over 998 octets: folded over SMTP, whole over LMTP.
        let mut long = b"To: ".to_vec();
        long.extend(std::iter::repeat_n(b'a', 1200));
        long.extend_from_slice(b"\r\n\r\n.");
        long.extend(std::iter::repeat_n(b'b', 2100));
        long.extend_from_slice(b"\r\n");
        content.splice(0..0, long);
    }
    let recipients = RECIPIENTS[..n]
        .iter()
        // Only flag 16 puts the UTF-8 address in.
        .filter(|r| flags & 16 != 0 || r.is_ascii())
        .map(|r| Recipient {
            to: parse_forward_path(r)
                .map(|p| p.0)
                .unwrap_or(tern_proto::ForwardPath::Postmaster),
            params: RcptParams::default(),
        })
        .collect();
    Message {
        from: parse_reverse_path("<s@x.test>")
            .map(|p| p.0)
            .unwrap_or(tern_proto::ReversePath::Null),
        params: MailParams {
            smtputf8: flags & 32 != 0,
            ..MailParams::default()
        },
        recipients,
        content: content.into(),
    }
}

struct Checker {
    closed: bool,
    /// Recipient counts of the messages handed in, in order.
    handed_in: Vec<usize>,
    outcomes: usize,
    msg_flags: u8,
}

impl Checker {
    fn drain(&mut self, c: &mut Client) {
        while let Some(e) = c.next_event() {
            assert!(!self.closed, "event after Close: {e:?}");
            match e {
                Event::Write(w) => {
                    for (i, &b) in w.iter().enumerate() {
                        if b == b'\n' {
                            assert!(i > 0 && w[i - 1] == b'\r', "bare LF written");
                        }
                        if b == b'\r' {
                            assert!(w.get(i + 1) == Some(&b'\n'), "bare CR written");
                        }
                    }
                }
                Event::Outcome(o) => {
                    let expected = self.handed_in.get(self.outcomes).copied();
                    assert_eq!(Some(o.recipients.len()), expected, "outcome count");
                    self.outcomes += 1;
                    for r in &o.recipients {
                        assert!((200..600).contains(&r.reply.code));
                        assert_eq!(sanitize(&r.reply), r.reply, "unsanitised reply");
                    }
                }
                Event::Ready if self.handed_in.len() < 3 => {
                    let m = message(self.msg_flags.rotate_left(self.handed_in.len() as u32));
                    let n = m.recipients.len();
                    if c.send(m).is_ok() {
                        self.handed_in.push(n);
                    }
                }
                Event::StartTls => c.tls_established(),
                Event::Close => self.closed = true,
                _ => {}
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 10 {
        return;
    }
    let (head, input) = data.split_at(10);
    let flags = head[0];
    let seeds = &head[2..10];
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
        chunk_size: if flags & 32 != 0 { 1 } else { 10 },
        credentials: (flags & 0x80 != 0).then(|| Credentials {
            username: "u".into(),
            password: "p".into(),
        }),
        auth_without_tls: head[1] & 64 != 0,
        helo_name: "client.fuzz".into(),
    };
    let mut c = Client::new(cfg);
    let mut k = Checker {
        closed: false,
        handed_in: Vec::new(),
        outcomes: 0,
        msg_flags: head[1],
    };
    // Half the runs hand a message in before the greeting.
    if head[1] & 128 != 0 {
        let m = message(head[1]);
        k.handed_in.push(m.recipients.len());
        assert!(c.send(m).is_ok());
    }
    k.drain(&mut c);
    let mut pos = 0;
    let mut turn = 0;
    while pos < input.len() {
        let len = usize::from(seeds[turn % seeds.len()]).max(1);
        turn += 1;
        let end = (pos + len).min(input.len());
        c.receive(&input[pos..end]);
        pos = end;
        k.drain(&mut c);
        if seeds[turn % seeds.len()] == 0 {
            c.timeout();
            k.drain(&mut c);
        }
    }
    if flags & 0x40 != 0 {
        c.quit();
        k.drain(&mut c);
    }
    c.eof();
    k.drain(&mut c);
    assert!(k.closed && c.is_closed(), "eof must end in Close");
    assert_eq!(k.outcomes, k.handed_in.len(), "one outcome per message");
});
