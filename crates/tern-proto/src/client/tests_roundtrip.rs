//! The client against Tern's own server `Session`, wired back to back with
//! random server decisions: what the client reports as delivered is exactly
//! what the server queued, once per recipient, with the content intact, in
//! the DATA and the BDAT forms, pipelined or not.

use std::collections::BTreeMap;

use super::tests::{message, statuses};
use super::*;
use crate::server::{Decision, Event as ServerEvent, Query, SaslData, ServerConfig, Session};
use proptest::prelude::*;

struct World {
    /// Recipients the server queued a message for, with the content it got.
    queued: Vec<(String, Vec<u8>)>,
    outcomes: Vec<MessageOutcome>,
}

/// Runs one connection carrying `messages`; `seeds` drive the server's
/// decisions; `hide` removes extensions from the server's EHLO reply.
fn run(
    messages: Vec<Message>,
    seeds: &[u8],
    server_max_rcpts: usize,
    client_max_rcpts: usize,
    hide: &[&str],
) -> World {
    let mut server = Session::new(ServerConfig {
        hostname: "mx.test".into(),
        max_recipients: server_max_rcpts,
        max_errors: 0,
        max_rejected_recipients: 0,
        ..ServerConfig::default()
    });
    let mut client = Client::new(ClientConfig {
        max_recipients: client_max_rcpts,
        chunk_size: 7,
        ..super::tests::config()
    });
    let mut pending: Vec<Message> = messages.into_iter().rev().collect();
    let mut world = World {
        queued: Vec::new(),
        outcomes: Vec::new(),
    };
    let mut body = Vec::new();
    let mut turn = 0usize;
    let mut to_client = Vec::new();
    let (mut client_closed, mut server_closed) = (false, false);
    for _ in 0..10_000 {
        let mut progress = false;
        while let Some(e) = client.next_event() {
            progress = true;
            match e {
                Event::Write(w) if !server_closed => server.receive(&w),
                Event::Ready => match pending.pop() {
                    Some(m) => client.send(m).unwrap(),
                    None => client.quit(),
                },
                Event::Outcome(o) => world.outcomes.push(o),
                Event::Close => {
                    client_closed = true;
                    server.eof();
                }
                _ => {}
            }
        }
        while let Some(e) = server.next_event() {
            progress = true;
            match e {
                ServerEvent::Reply(mut r) => {
                    if r.lines.len() > 1 {
                        r.lines.retain(|l| !hide.contains(&l.as_str()));
                    }
                    to_client.extend(r.to_bytes());
                }
                ServerEvent::Query(q) => {
                    let seed = seeds.get(turn % seeds.len().max(1)).copied().unwrap_or(0);
                    turn += 1;
                    let d = match (&q, seed % 6) {
                        (Query::Mail { .. }, 0) => {
                            Decision::Reject(Reply::enhanced(451, (4, 3, 0), "later"))
                        }
                        (Query::Rcpt { .. }, 0) => {
                            Decision::Reject(Reply::enhanced(550, (5, 1, 1), "unknown"))
                        }
                        (Query::Rcpt { .. }, 1) => {
                            Decision::Reject(Reply::enhanced(450, (4, 2, 0), "grey"))
                        }
                        (Query::EndOfData, 0) => {
                            Decision::Reject(Reply::enhanced(554, (5, 7, 1), "spam"))
                        }
                        (Query::EndOfData, _) => {
                            if let Some(tx) = server.transaction() {
                                for (to, _) in &tx.rcpts {
                                    world.queued.push((to.to_string(), body.clone()));
                                }
                            }
                            Decision::Queued {
                                queue_id: "Q".into(),
                            }
                        }
                        _ => Decision::Accept,
                    };
                    if matches!(q, Query::Data | Query::Mail { .. }) {
                        body.clear();
                    }
                    server.decide(d);
                }
                ServerEvent::Body(b) => body.extend_from_slice(&b),
                ServerEvent::MessageAborted(_) | ServerEvent::MessageRefused(_) => body.clear(),
                ServerEvent::Close => {
                    server_closed = true;
                    client.eof();
                }
                ServerEvent::StartTls => panic!("STARTTLS is not offered here"),
            }
        }
        if !to_client.is_empty() {
            client.receive(&to_client);
            to_client.clear();
            progress = true;
        }
        if !progress {
            break;
        }
    }
    assert!(client_closed, "the client must end: {:?}", world.outcomes);
    world
}

fn check(world: &World, messages: &[Message]) {
    assert_eq!(world.outcomes.len(), messages.len());
    let mut delivered: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for (m, o) in messages.iter().zip(&world.outcomes) {
        assert_eq!(o.recipients.len(), m.recipients.len());
        for (r, out) in m.recipients.iter().zip(&o.recipients) {
            if out.status == Status::Delivered {
                let prev = delivered.insert(r.to.to_string(), m.content.to_vec());
                assert!(prev.is_none(), "delivered twice: {}", r.to);
            }
        }
    }
    let mut queued: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for (to, b) in &world.queued {
        assert!(
            queued.insert(to.clone(), b.clone()).is_none(),
            "queued twice: {to}"
        );
    }
    assert_eq!(delivered, queued);
}

fn messages(counts: &[usize], content: &[u8]) -> Vec<Message> {
    let mut k = 0;
    counts
        .iter()
        .map(|&n| {
            let to: Vec<String> = (0..n)
                .map(|_| {
                    k += 1;
                    format!("r{k}@d.test")
                })
                .collect();
            let to: Vec<&str> = to.iter().map(String::as_str).collect();
            let mut m = message("s@b.test", &to, "");
            m.content = bytes::Bytes::copy_from_slice(content);
            m
        })
        .collect()
}

const CONTENT: &[u8] = b"Subject: round trip\r\n\r\n.leading dot\r\n..two\r\n.\r\nend\r\n";

#[test]
fn every_form_delivers_everything() {
    for hide in [
        &[][..],
        &["CHUNKING"],
        &["PIPELINING"],
        &["CHUNKING", "PIPELINING"],
    ] {
        let ms = messages(&[3, 1, 5], CONTENT);
        let w = run(ms.clone(), &[5], 100, 0, hide);
        check(&w, &ms);
        for o in &w.outcomes {
            assert!(
                statuses(o).iter().all(|s| *s == Status::Delivered),
                "{hide:?}"
            );
        }
    }
}

#[test]
fn server_recipient_limit_splits_transactions() {
    let ms = messages(&[5], CONTENT);
    let w = run(ms.clone(), &[5], 2, 0, &[]);
    check(&w, &ms);
    assert_eq!(statuses(&w.outcomes[0]), vec![Status::Delivered; 5]);
    assert_eq!(w.queued.len(), 5);
}

fn arb_content() -> impl Strategy<Value = Vec<u8>> {
    let line = prop::collection::vec(
        prop_oneof![Just(b'.'), Just(b' '), Just(b'x'), 0x21u8..0x7f],
        0..30,
    );
    prop::collection::vec(line, 0..8).prop_map(|ls| {
        let mut v = b"Subject: p\r\n\r\n".to_vec();
        for l in ls {
            v.extend_from_slice(&l);
            v.extend_from_slice(b"\r\n");
        }
        v
    })
}

proptest! {
    #[test]
    fn against_our_server_delivered_means_queued(
        counts in prop::collection::vec(1usize..5, 1..4),
        seeds in prop::collection::vec(any::<u8>(), 1..20),
        server_max in 1usize..4,
        client_max in 0usize..4,
        hide_chunking in any::<bool>(),
        hide_pipelining in any::<bool>(),
        content in arb_content(),
    ) {
        let mut hide = Vec::new();
        if hide_chunking { hide.push("CHUNKING"); }
        if hide_pipelining { hide.push("PIPELINING"); }
        let ms = messages(&counts, &content);
        let w = run(ms.clone(), &seeds, server_max, client_max, &hide);
        check(&w, &ms);
    }
}

/// Our client with credentials and TLS required against our server on a
/// submission port (STARTTLS, AUTH before MAIL): both sides run the
/// handshake when each asks for it, the server's driver checks the
/// client's PLAIN or LOGIN credentials. Returns the server's queries and
/// the client's outcomes.
fn submit(mechanisms: &[&str], password: &str) -> (Vec<Query>, Vec<MessageOutcome>) {
    let mut server = Session::new(ServerConfig {
        hostname: "mx.test".into(),
        starttls: true,
        auth_mechanisms: mechanisms
            .iter()
            .map(|m| m.to_string())
            .collect::<Vec<_>>()
            .into(),
        require_auth: true,
        ..ServerConfig::default()
    });
    let mut client = Client::new(ClientConfig {
        tls: TlsPolicy::Require,
        credentials: Some(Credentials {
            username: "user".into(),
            password: password.into(),
        }),
        ..super::tests::config()
    });
    let mut pending = vec![message(
        "user@b.test",
        &["r@d.test"],
        "Subject: s\r\n\r\nhi\r\n",
    )];
    let (mut queries, mut outcomes) = (Vec::new(), Vec::new());
    let mut to_client = Vec::new();
    let mut server_in_handshake = false;
    let mut login_step = 0;
    for _ in 0..1000 {
        let mut progress = false;
        while let Some(e) = client.next_event() {
            progress = true;
            match e {
                Event::Write(w) => server.receive(&w),
                Event::StartTls => {
                    // The server asked first (its 220 came before the
                    // client's event); both layers start now.
                    assert!(server_in_handshake);
                    server_in_handshake = false;
                    server.tls_established();
                    client.tls_established();
                }
                Event::Ready => match pending.pop() {
                    Some(m) => client.send(m).unwrap(),
                    None => client.quit(),
                },
                Event::Outcome(o) => outcomes.push(o),
                Event::Close => server.eof(),
                _ => {}
            }
        }
        while let Some(e) = server.next_event() {
            progress = true;
            match e {
                ServerEvent::Reply(r) => to_client.extend(r.to_bytes()),
                ServerEvent::StartTls => server_in_handshake = true,
                ServerEvent::Query(q) => {
                    let ok = Decision::Accept;
                    let no = Decision::Reject(Reply::enhanced(535, (5, 7, 8), "bad credentials"));
                    let d = match &q {
                        Query::Auth { mechanism, initial } if mechanism == "PLAIN" => {
                            match initial.as_ref().map(SaslData::as_bytes) {
                                Some(b"\0user\0secret") => ok,
                                _ => no,
                            }
                        }
                        Query::Auth { .. } => Decision::AuthChallenge(b"Username:".to_vec()),
                        Query::AuthResponse(r) => {
                            login_step += 1;
                            match (login_step, r.as_bytes()) {
                                (1, b"user") => Decision::AuthChallenge(b"Password:".to_vec()),
                                (2, b"secret") => ok,
                                _ => no,
                            }
                        }
                        _ => Decision::Accept,
                    };
                    queries.push(q);
                    server.decide(d);
                }
                ServerEvent::Close => client.eof(),
                _ => {}
            }
        }
        if !to_client.is_empty() {
            client.receive(&to_client);
            to_client.clear();
            progress = true;
        }
        if !progress {
            break;
        }
    }
    assert!(client.is_closed() && server.is_closed());
    (queries, outcomes)
}

#[test]
fn our_client_submits_through_starttls_and_auth() {
    for mechanisms in [&["PLAIN", "LOGIN"][..], &["LOGIN"]] {
        let (queries, outcomes) = submit(mechanisms, "secret");
        assert_eq!(outcomes.len(), 1);
        assert_eq!(
            statuses(&outcomes[0]),
            vec![Status::Delivered],
            "{mechanisms:?}"
        );
        // Connect, EHLO in plain text and again through TLS, AUTH, the mail.
        let helos = queries
            .iter()
            .filter(|q| matches!(q, Query::Helo { .. }))
            .count();
        assert_eq!(helos, 2);
        assert!(matches!(&queries[3], Query::Auth { mechanism, .. } if mechanism == mechanisms[0]));
    }
    // Wrong password: the connection fails before the message is handed in.
    let (queries, outcomes) = submit(&["PLAIN"], "wrong");
    assert!(queries.iter().any(|q| matches!(q, Query::Auth { .. })));
    assert!(!queries.iter().any(|q| matches!(q, Query::Mail { .. })));
    assert!(outcomes.is_empty());
}
