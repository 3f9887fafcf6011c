//! The driver against real peers on loopback: Postfix's `smtp-sink`, and
//! small scripted SMTP/LMTP servers for the failures smtp-sink cannot
//! play (a 421 greeting, a cut in the middle of DATA, mixed RCPT replies,
//! LMTP's per-recipient replies).

use super::*;
use crate::dns::testserver::{TestDns, Zone};
use crate::dns::{Dns, DnsSettings};
use crate::route::{AddressFamilies, Host, Router, RouterSettings, Routes};
use rand::SeedableRng;
use rand::rngs::StdRng;
use std::path::PathBuf;
use tern_proto::client::Recipient;
use tern_proto::{MailParams, RcptParams, parse_forward_path, parse_reverse_path};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{TcpListener, UnixListener};
use tokio::task::JoinHandle;

pub(super) fn message(to: &[&str], content: &str) -> Message {
    Message {
        from: parse_reverse_path("<sender@tern.test>").unwrap().0,
        params: MailParams::default(),
        recipients: to
            .iter()
            .map(|t| Recipient {
                to: parse_forward_path(&format!("<{t}>")).unwrap().0,
                params: RcptParams::default(),
            })
            .collect(),
        content: bytes::Bytes::copy_from_slice(content.as_bytes()),
    }
}

pub(super) fn settings() -> SmtpSettings {
    SmtpSettings {
        helo_name: "out.tern.test".into(),
        connect_timeout: Duration::from_secs(10),
        tls: TlsMode::None,
        // Long enough for a loaded test machine, short enough to fail a
        // hung test quickly.
        stage_timeout: |_| Duration::from_secs(20),
        ..SmtpSettings::default()
    }
}

pub(super) fn tcp_host(name: &str, addrs: &[SocketAddr]) -> Host {
    Host {
        name: name.into(),
        preference: None,
        target: Target::Tcp(addrs.to_vec()),
    }
}

pub(super) fn delivery(transport: Transport, hosts: Vec<Host>) -> Delivery {
    Delivery {
        destination: Routes::default().destination("example.test"),
        transport,
        hosts,
    }
}

/// An address nobody listens on: a port just released.
fn refused_address() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

pub(super) fn statuses(report: &MessageReport) -> Vec<Status> {
    report.recipients.iter().map(|r| r.status).collect()
}

pub(super) fn answered_by(report: &MessageReport) -> Vec<Option<&str>> {
    report
        .recipients
        .iter()
        .map(|r| r.answered_by.as_ref().map(|p| p.host.as_str()))
        .collect()
}

/// What a scripted server says.
#[derive(Clone)]
struct Script {
    greeting: &'static str,
    ehlo: &'static str,
    /// Replies to RCPT in order; `250 2.1.5 ok` once they run out.
    rcpt: Vec<&'static str>,
    /// Replies after the content (LMTP: one per accepted recipient).
    data_end: Vec<&'static str>,
    /// Close the connection after the first line of content.
    cut_in_data: bool,
    /// Never greet: the client's greeting timeout is tested.
    silent: bool,
    /// Stop reading after the 354: the client's writes block.
    stall_in_data: bool,
    /// The reply to STARTTLS (the handshake is `tests_tls`'s).
    starttls: &'static str,
}

impl Default for Script {
    fn default() -> Self {
        Script {
            greeting: "220 mx.test ESMTP\r\n",
            ehlo: "250-mx.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n",
            rcpt: Vec::new(),
            data_end: vec!["250 2.0.0 queued"],
            cut_in_data: false,
            silent: false,
            stall_in_data: false,
            starttls: "454 4.7.0 TLS not available due to temporary reason",
        }
    }
}

/// Plays `script` on one connection; returns the contents received (as
/// sent, dot-stuffed, up to the final dot).
async fn play<S: AsyncRead + AsyncWrite + Unpin>(stream: S, script: &Script) -> Vec<Vec<u8>> {
    let mut stream = BufReader::new(stream);
    let mut received = Vec::new();
    if script.silent {
        let mut line = Vec::new();
        let _ = stream.read_until(b'\n', &mut line).await;
        return received;
    }
    stream.write_all(script.greeting.as_bytes()).await.unwrap();
    if !script.greeting.starts_with('2') {
        return received;
    }
    let mut rcpt = script.rcpt.iter();
    loop {
        let mut line = Vec::new();
        if stream.read_until(b'\n', &mut line).await.unwrap_or(0) == 0 {
            return received;
        }
        let command = String::from_utf8_lossy(&line).to_ascii_uppercase();
        let reply: String = if command.starts_with("EHLO") || command.starts_with("LHLO") {
            script.ehlo.into()
        } else if command.starts_with("RCPT") {
            format!("{}\r\n", rcpt.next().copied().unwrap_or("250 2.1.5 ok"))
        } else if command.starts_with("STARTTLS") {
            format!("{}\r\n", script.starttls)
        } else if command.starts_with("DATA") {
            stream.write_all(b"354 go on\r\n").await.unwrap();
            if script.stall_in_data {
                // Held open, unread, until the test's runtime ends.
                std::future::pending::<()>().await;
            }
            let mut content = Vec::new();
            loop {
                let mut line = Vec::new();
                if stream.read_until(b'\n', &mut line).await.unwrap_or(0) == 0 {
                    return received;
                }
                if script.cut_in_data {
                    return received;
                }
                if line == b".\r\n" {
                    break;
                }
                content.extend_from_slice(&line);
            }
            received.push(content);
            script.data_end.iter().map(|r| format!("{r}\r\n")).collect()
        } else if command.starts_with("QUIT") {
            let _ = stream.write_all(b"221 2.0.0 bye\r\n").await;
            return received;
        } else {
            "250 2.0.0 ok\r\n".into()
        };
        if stream.write_all(reply.as_bytes()).await.is_err() {
            return received;
        }
    }
}

/// A scripted server on 127.0.0.1 (any free port) for `connections`
/// connections in turn; returns every content received.
async fn scripted(script: Script, connections: usize) -> (SocketAddr, JoinHandle<Vec<Vec<u8>>>) {
    scripted_on("127.0.0.1:0", script, connections).await
}

async fn scripted_on(
    bind: &str,
    script: Script,
    connections: usize,
) -> (SocketAddr, JoinHandle<Vec<Vec<u8>>>) {
    let listener = TcpListener::bind(bind).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut all = Vec::new();
        for _ in 0..connections {
            let (stream, _) = listener.accept().await.unwrap();
            all.extend(play(stream, &script).await);
        }
        all
    });
    (addr, task)
}

#[tokio::test]
async fn refused_greeting_421_moves_on_to_the_next_host() {
    let busy = Script {
        greeting: "421 4.3.2 too busy\r\n",
        ..Script::default()
    };
    let (a, a_task) = scripted(busy, 1).await;
    let (b, b_task) = scripted(Script::default(), 1).await;
    let d = delivery(
        Transport::Smtp,
        vec![tcp_host("a.mx.test", &[a]), tcp_host("b.mx.test", &[b])],
    );
    let m = message(
        &["one@example.test", "two@example.test"],
        "Subject: x\r\n\r\nhi\r\n",
    );
    let report = deliver(&d, &[m], &settings()).await;

    assert_eq!(report.messages.len(), 1);
    assert_eq!(statuses(&report.messages[0]), [Status::Delivered; 2]);
    assert_eq!(
        answered_by(&report.messages[0]),
        [Some("b.mx.test"), Some("b.mx.test")]
    );
    assert_eq!(report.connections.len(), 2);
    let first = report.connections[0].failure.as_ref().unwrap();
    assert_eq!(first.reply.code, 421);
    assert!(!first.local);
    assert_eq!(report.connections[1].failure, None);
    assert!(a_task.await.unwrap().is_empty());
    assert_eq!(
        b_task.await.unwrap(),
        [b"Subject: x\r\n\r\nhi\r\n".to_vec()]
    );
}

#[tokio::test]
async fn refused_connection_moves_on_to_the_next_address() {
    let (good, task) = scripted(Script::default(), 1).await;
    let refused = refused_address();
    let d = delivery(Transport::Smtp, vec![tcp_host("mx.test", &[refused, good])]);
    let report = deliver(&d, &[message(&["u@example.test"], "a\r\n")], &settings()).await;

    assert_eq!(statuses(&report.messages[0]), [Status::Delivered]);
    let answered = report.messages[0].recipients[0]
        .answered_by
        .clone()
        .unwrap();
    assert_eq!(answered.address, good.to_string());
    assert_eq!(report.connections.len(), 2);
    let refusal = report.connections[0].failure.as_ref().unwrap();
    assert!(refusal.local);
    assert_eq!(refusal.reply.code, 451);
    assert_eq!(task.await.unwrap().len(), 1);
}

#[tokio::test]
async fn cut_during_data_fails_that_message_temporarily_and_keeps_the_rest_pending() {
    let cut = Script {
        cut_in_data: true,
        ..Script::default()
    };
    let (addr, task) = scripted(cut, 1).await;
    let d = delivery(Transport::Smtp, vec![tcp_host("mx.test", &[addr])]);
    let first = message(
        &["a@example.test", "b@example.test"],
        "line one\r\nline two\r\n",
    );
    let second = message(&["c@example.test"], "other\r\n");
    let report = deliver(&d, &[first, second], &settings()).await;

    // Taken by the server and lost: the server's fate, temporary.
    assert_eq!(statuses(&report.messages[0]), [Status::Temporary; 2]);
    assert_eq!(
        answered_by(&report.messages[0]),
        [Some("mx.test"), Some("mx.test")]
    );
    // Never taken: the connection-level reason, no host named.
    assert_eq!(statuses(&report.messages[1]), [Status::Temporary]);
    assert_eq!(answered_by(&report.messages[1]), [None]);
    assert_eq!(report.messages[1].recipients[0].reply.code, 451);
    assert_eq!(report.connections.len(), 1);
    assert!(report.connections[0].failure.is_some());
    assert!(task.await.unwrap().is_empty());
}

#[tokio::test]
async fn one_refused_recipient_of_three() {
    let script = Script {
        rcpt: vec!["250 2.1.5 ok", "550 5.1.1 no such user", "250 2.1.5 ok"],
        ..Script::default()
    };
    let (addr, task) = scripted(script, 1).await;
    let d = delivery(Transport::Smtp, vec![tcp_host("mx.test", &[addr])]);
    let m = message(
        &["a@example.test", "b@example.test", "c@example.test"],
        "x\r\n",
    );
    let report = deliver(&d, &[m], &settings()).await;

    let outcome = &report.messages[0];
    assert_eq!(
        statuses(outcome),
        [Status::Delivered, Status::Permanent, Status::Delivered]
    );
    assert_eq!(outcome.recipients[1].reply.code, 550);
    assert_eq!(outcome.recipients[1].reply.lines, ["no such user"]);
    assert!(!outcome.recipients[1].local);
    assert_eq!(report.connections.len(), 1);
    assert_eq!(report.connections[0].failure, None);
    assert_eq!(task.await.unwrap().len(), 1);
}

/// A 5.7.x refusal over IPv6 is retried over the host's IPv4 address before
/// it counts; the recipient IPv6 took stays delivered, sent once.
#[tokio::test]
async fn a_policy_refusal_over_ipv6_is_retried_over_ipv4() {
    let refusing = Script {
        rcpt: vec!["250 2.1.5 ok", "550 5.7.1 IPv6 sender has no PTR record"],
        ..Script::default()
    };
    let (v6, v6_task) = scripted_on("[::1]:0", refusing, 1).await;
    let (v4, v4_task) = scripted(Script::default(), 1).await;
    let d = delivery(Transport::Smtp, vec![tcp_host("mx.test", &[v6, v4])]);
    let m = message(&["a@example.test", "b@example.test"], "x\r\n");
    let report = deliver(&d, &[m], &settings()).await;
    let outcome = &report.messages[0];
    assert_eq!(statuses(outcome), [Status::Delivered, Status::Delivered]);
    let addresses: Vec<_> = outcome
        .recipients
        .iter()
        .map(|r| r.answered_by.as_ref().map(|p| p.address.clone()))
        .collect();
    assert_eq!(addresses, [Some(v6.to_string()), Some(v4.to_string())]);
    assert_eq!(v6_task.await.unwrap().len(), 1);
    let retried = v4_task.await.unwrap();
    assert_eq!(retried.len(), 1);
    // Only the refused recipient went again.
    assert_eq!(report.messages.len(), 1);

    // With no IPv4 address to try, the refusal stands as permanent.
    let refusing = Script {
        rcpt: vec!["550 5.7.1 IPv6 sender has no PTR record"],
        ..Script::default()
    };
    let (v6, _task) = scripted_on("[::1]:0", refusing, 1).await;
    let d = delivery(Transport::Smtp, vec![tcp_host("mx.test", &[v6])]);
    let report = deliver(&d, &[message(&["b@example.test"], "x\r\n")], &settings()).await;
    assert_eq!(statuses(&report.messages[0]), [Status::Permanent]);
}

#[tokio::test]
async fn connections_carry_at_most_the_configured_number_of_messages() {
    let (addr, task) = scripted(Script::default(), 2).await;
    let d = delivery(Transport::Smtp, vec![tcp_host("mx.test", &[addr])]);
    let messages: Vec<Message> = (0..3)
        .map(|i| message(&["a@example.test"], &format!("message {i}\r\n")))
        .collect();
    let report = deliver(
        &d,
        &messages,
        &SmtpSettings {
            max_messages_per_connection: 2,
            ..settings()
        },
    )
    .await;

    for m in &report.messages {
        assert_eq!(statuses(m), [Status::Delivered]);
    }
    let per_connection: Vec<usize> = report.connections.iter().map(|c| c.messages).collect();
    assert_eq!(per_connection, [2, 1]);
    assert_eq!(task.await.unwrap().len(), 3);
}

#[tokio::test]
async fn a_silent_server_times_out_at_the_greeting() {
    let silent = Script {
        silent: true,
        ..Script::default()
    };
    let (addr, _task) = scripted(silent, 1).await;
    let d = delivery(Transport::Smtp, vec![tcp_host("mx.test", &[addr])]);
    let report = deliver(
        &d,
        &[message(&["a@example.test"], "x\r\n")],
        &SmtpSettings {
            stage_timeout: |_| Duration::from_millis(200),
            ..settings()
        },
    )
    .await;

    let rcpt = &report.messages[0].recipients[0];
    assert_eq!(rcpt.status, Status::Temporary);
    assert_eq!(rcpt.answered_by, None);
    assert!(
        rcpt.reply.to_string().contains("greeting"),
        "{}",
        rcpt.reply
    );
}

#[tokio::test]
async fn starttls_refused_fails_under_require_and_goes_on_in_plain_text_under_opportunistic() {
    let offering = Script {
        ehlo: "250-mx.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n",
        ..Script::default()
    };
    let (addr, _task) = scripted(offering.clone(), 1).await;
    let d = delivery(Transport::Smtp, vec![tcp_host("mx.test", &[addr])]);
    let m = message(&["a@example.test"], "x\r\n");
    let required = SmtpSettings {
        tls: TlsMode::Require,
        ..settings()
    };
    let report = deliver(&d, std::slice::from_ref(&m), &required).await;
    let rcpt = &report.messages[0].recipients[0];
    assert_eq!(rcpt.status, Status::Temporary);
    assert_eq!(rcpt.reply.code, 451);
    assert!(
        rcpt.reply.to_string().contains("TLS required"),
        "{}",
        rcpt.reply
    );
    assert_eq!(report.connections.len(), 1);

    let (addr, task) = scripted(offering, 1).await;
    let d = delivery(Transport::Smtp, vec![tcp_host("mx.test", &[addr])]);
    let opportunistic = SmtpSettings {
        tls: TlsMode::Opportunistic,
        ..settings()
    };
    let report = deliver(&d, &[m], &opportunistic).await;
    assert_eq!(statuses(&report.messages[0]), [Status::Delivered]);
    assert_eq!(report.connections.len(), 1);
    assert_eq!(report.connections[0].tls, None);
    assert_eq!(task.await.unwrap().len(), 1);
}

#[tokio::test]
async fn lmtp_over_a_unix_socket_reports_each_recipient() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lmtp");
    let listener = UnixListener::bind(&path).unwrap();
    let script = Script {
        greeting: "220 lmtp.test LMTP\r\n",
        ehlo: "250-lmtp.test\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES\r\n",
        data_end: vec![
            "250 2.0.0 <a@example.test> saved",
            "452 4.2.2 <b@example.test> over quota",
            "550 5.1.1 <c@example.test> gone",
        ],
        ..Script::default()
    };
    let task = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        play(stream, &script).await
    });
    let d = delivery(
        Transport::Lmtp,
        vec![Host {
            name: "dovecot".into(),
            preference: None,
            target: Target::Unix(PathBuf::from(&path)),
        }],
    );
    let m = message(
        &["a@example.test", "b@example.test", "c@example.test"],
        "Subject: local\r\n\r\nhello\r\n",
    );
    let report = deliver(&d, &[m], &settings()).await;

    let outcome = &report.messages[0];
    assert_eq!(
        statuses(outcome),
        [Status::Delivered, Status::Temporary, Status::Permanent]
    );
    let peer = outcome.recipients[0].answered_by.clone().unwrap();
    assert_eq!(peer.address, format!("unix:{}", path.display()));
    assert_eq!(report.connections[0].failure, None);
    assert_eq!(task.await.unwrap().len(), 1);
}

#[tokio::test]
async fn primary_mx_down_backup_mx_gets_the_mail() {
    // Both MX hosts share the router's port; only the backup listens on it.
    let (backup, task) = scripted_on("127.0.0.3:0", Script::default(), 1).await;
    let zone = "
mx.example        MX 10 primary.mx.example
mx.example        MX 20 backup.mx.example
primary.mx.example A 127.0.0.2
backup.mx.example  A 127.0.0.3
";
    let dns_server = TestDns::start(Zone::parse(zone).unwrap(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let dns = Dns::new(&DnsSettings {
        nameservers: vec![dns_server.addr()],
        timeout: Duration::from_secs(10),
        attempts: 1,
        ..DnsSettings::default()
    })
    .unwrap();
    let router = Router::new(
        dns,
        Routes::default(),
        RouterSettings {
            hostname: "out.tern.test".into(),
            families: AddressFamilies::Ipv4First,
            mx_port: backup.port(),
        },
    );
    let d = router
        .resolve("mx.example", &mut StdRng::seed_from_u64(1))
        .await
        .unwrap();
    let report = deliver(&d, &[message(&["u@mx.example"], "x\r\n")], &settings()).await;

    assert_eq!(statuses(&report.messages[0]), [Status::Delivered]);
    assert_eq!(
        answered_by(&report.messages[0]),
        [Some("backup.mx.example")]
    );
    let hosts: Vec<&str> = report
        .connections
        .iter()
        .map(|c| c.peer.host.as_str())
        .collect();
    assert_eq!(hosts, ["primary.mx.example", "backup.mx.example"]);
    assert_eq!(task.await.unwrap().len(), 1);
}

/// A running `smtp-sink` dumping each message into a directory; killed on
/// drop.
struct Sink {
    _process: tokio::process::Child,
    /// The TCP address, when it listens on TCP.
    addr: SocketAddr,
    dumps: tempfile::TempDir,
}

async fn smtp_sink() -> Sink {
    smtp_sink_with(&[], "127.0.0.1").await
}

/// Starts smtp-sink with `flags` on `listen`: an IP address (a free port is
/// picked) or `unix:PATH`.
async fn smtp_sink_with(flags: &[&str], listen: &str) -> Sink {
    let dumps = tempfile::tempdir().unwrap();
    let template = format!("{}/msg.", dumps.path().display());
    let deadline = Instant::now() + Duration::from_secs(20);
    let unix = listen.strip_prefix("unix:").map(PathBuf::from);
    loop {
        // A port just released is almost always still free; retry if not.
        let addr = refused_address();
        let endpoint = match unix {
            Some(_) => listen.to_string(),
            None => format!("{listen}:{}", addr.port()),
        };
        let mut command = tokio::process::Command::new("/usr/sbin/smtp-sink");
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            command.args(["-u", "root"]);
        }
        let mut process = command
            .args(flags)
            .args(["-d", &template, &endpoint, "16"])
            .kill_on_drop(true)
            .spawn()
            .expect("smtp-sink (installed by scripts/test.sh)");
        while Instant::now() < deadline {
            let up = match &unix {
                Some(path) => UnixStream::connect(path).await.is_ok(),
                None => TcpStream::connect(addr).await.is_ok(),
            };
            if up {
                return Sink {
                    _process: process,
                    addr,
                    dumps,
                };
            }
            if process.try_wait().unwrap().is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(Instant::now() < deadline, "smtp-sink did not start");
    }
}

/// The dumped messages, each without smtp-sink's own header lines (up to
/// and including its three-line `Received:`), LF line ends.
async fn dumped(sink: &Sink, count: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut files: Vec<String> = std::fs::read_dir(sink.dumps.path())
            .unwrap()
            .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
            .collect();
        if files.len() >= count && files.iter().all(|f| f.ends_with("\n\n")) {
            files.sort();
            return files
                .into_iter()
                .map(|f| {
                    let at = f.find("\nReceived: ").unwrap();
                    let rest = &f[at + 1..];
                    let body: Vec<&str> = rest.split('\n').skip(3).collect();
                    // Less smtp-sink's closing empty line.
                    let mut body = body.join("\n");
                    body.pop();
                    body
                })
                .collect();
        }
        assert!(
            Instant::now() < deadline,
            "smtp-sink dumped {}",
            files.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn smtp_sink_takes_three_messages_over_one_connection() {
    let sink = smtp_sink().await;
    let d = delivery(Transport::Smtp, vec![tcp_host("sink", &[sink.addr])]);
    let plain = "Subject: one\r\n\r\nplain\r\n";
    let dots = "Subject: two\r\n\r\n.leading dot\r\n.\r\n..two dots\r\nend\r\n";
    let long = format!("Subject: three\r\n\r\n{}\r\n", "x".repeat(1_000_000));
    let messages = [
        message(&["a@example.test"], plain),
        message(&["b@example.test", "c@example.test"], dots),
        message(&["d@example.test"], &long),
    ];
    let report = deliver(&d, &messages, &settings()).await;

    for m in &report.messages {
        assert!(
            m.recipients.iter().all(|r| r.status == Status::Delivered),
            "{m:?}"
        );
        assert!(m.recipients.iter().all(|r| r.answered_by.is_some()));
    }
    assert_eq!(report.connections.len(), 1);
    assert_eq!(report.connections[0].messages, 3);
    assert_eq!(report.connections[0].failure, None);

    let bodies = dumped(&sink, 3).await;
    let lf = |s: &str| s.replace("\r\n", "\n");
    assert!(bodies.contains(&lf(plain)), "{bodies:?}");
    assert!(bodies.contains(&lf(dots)), "{bodies:?}");
    let folded = bodies
        .iter()
        .find(|b| b.starts_with("Subject: three"))
        .unwrap();
    assert!(folded.lines().all(|l| l.len() <= 998));
    assert_eq!(folded.bytes().filter(|&b| b == b'x').count(), 1_000_000);
}

#[tokio::test]
async fn a_hostile_server_flooding_one_endless_line_fails_temporarily_and_the_next_host_is_used() {
    let hostile = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hostile_addr = hostile.local_addr().unwrap();
    let flood = tokio::spawn(async move {
        let (mut stream, _) = hostile.accept().await.unwrap();
        let chunk = vec![b'2'; 64 * 1024];
        // 16 MiB and no line end; the client must give up long before.
        for _ in 0..256 {
            if stream.write_all(&chunk).await.is_err() {
                return true;
            }
        }
        false
    });
    let garbage = Script {
        greeting: "hello there\r\n",
        ..Script::default()
    };
    let (garbage_addr, _garbage_task) = scripted(garbage, 1).await;
    let (good, task) = scripted(Script::default(), 1).await;
    let d = delivery(
        Transport::Smtp,
        vec![
            tcp_host("flood.mx.test", &[hostile_addr]),
            tcp_host("garbage.mx.test", &[garbage_addr]),
            tcp_host("good.mx.test", &[good]),
        ],
    );
    let report = deliver(&d, &[message(&["a@example.test"], "x\r\n")], &settings()).await;

    assert_eq!(statuses(&report.messages[0]), [Status::Delivered]);
    assert_eq!(answered_by(&report.messages[0]), [Some("good.mx.test")]);
    let failures: Vec<(u16, bool)> = report
        .connections
        .iter()
        .filter_map(|c| c.failure.as_ref())
        .map(|f| (f.reply.code, f.local))
        .collect();
    assert_eq!(failures, [(451, true), (451, true)]);
    assert!(flood.await.unwrap(), "the client read the whole flood");
    assert_eq!(task.await.unwrap().len(), 1);
}

#[tokio::test]
async fn smtp_sink_refusing_every_recipient_fails_them_permanently_on_a_clean_connection() {
    let sink = smtp_sink_with(&["-f", "rcpt"], "127.0.0.1").await;
    let d = delivery(Transport::Smtp, vec![tcp_host("sink", &[sink.addr])]);
    let messages = [
        message(&["a@example.test", "b@example.test"], "one\r\n"),
        message(&["c@example.test"], "two\r\n"),
    ];
    let report = deliver(&d, &messages, &settings()).await;

    assert_eq!(statuses(&report.messages[0]), [Status::Permanent; 2]);
    assert_eq!(statuses(&report.messages[1]), [Status::Permanent]);
    assert_eq!(report.messages[1].recipients[0].reply.code / 100, 5);
    assert_eq!(answered_by(&report.messages[1]), [Some("sink")]);
    assert_eq!(report.connections.len(), 1);
    assert_eq!(report.connections[0].failure, None);
}

#[tokio::test]
async fn lmtp_to_smtp_sink_over_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lmtp");
    let sink = smtp_sink_with(&["-L"], &format!("unix:{}", path.display())).await;
    let d = delivery(
        Transport::Lmtp,
        vec![Host {
            name: "lmtp-sink".into(),
            preference: None,
            target: Target::Unix(path.clone()),
        }],
    );
    let messages = [
        message(
            &["a@example.test", "b@example.test"],
            "Subject: 1\r\n\r\none\r\n",
        ),
        message(&["c@example.test"], "Subject: 2\r\n\r\n.two\r\n"),
    ];
    let report = deliver(&d, &messages, &settings()).await;

    assert_eq!(statuses(&report.messages[0]), [Status::Delivered; 2]);
    assert_eq!(statuses(&report.messages[1]), [Status::Delivered]);
    assert_eq!(report.connections.len(), 1);
    let bodies = dumped(&sink, 2).await;
    assert!(
        bodies.contains(&"Subject: 2\n\n.two\n".to_string()),
        "{bodies:?}"
    );
}

#[tokio::test]
async fn nothing_to_send_or_nowhere_to_send_it() {
    let d = delivery(
        Transport::Smtp,
        vec![tcp_host("mx.test", &[refused_address()])],
    );
    let report = deliver(&d, &[], &settings()).await;
    assert!(report.messages.is_empty());
    assert!(
        report.connections.is_empty(),
        "no connection for no message"
    );

    let nowhere = delivery(Transport::Smtp, Vec::new());
    let report = deliver(
        &nowhere,
        &[message(&["a@example.test"], "x\r\n")],
        &settings(),
    )
    .await;
    let rcpt = &report.messages[0].recipients[0];
    assert_eq!(rcpt.status, Status::Temporary);
    assert_eq!(rcpt.reply.to_string(), "451 4.4.4 no host to deliver to");
}

#[tokio::test]
async fn smtp_sink_takes_credentials_only_where_plain_text_auth_is_allowed() {
    let sink = smtp_sink().await;
    let d = delivery(Transport::Smtp, vec![tcp_host("relay", &[sink.addr])]);
    let m = message(&["a@example.test"], "x\r\n");
    let with_credentials = SmtpSettings {
        credentials: Some(Credentials {
            username: "tern".into(),
            password: "secret".into(),
        }),
        ..settings()
    };
    let report = deliver(&d, std::slice::from_ref(&m), &with_credentials).await;
    let rcpt = &report.messages[0].recipients[0];
    assert_eq!(rcpt.status, Status::Temporary);
    assert_eq!(
        rcpt.reply.enhanced.map(|e| e.to_string()),
        Some("4.7.11".into())
    );

    let allowed = SmtpSettings {
        auth_without_tls: true,
        ..with_credentials
    };
    let report = deliver(&d, &[m], &allowed).await;
    assert_eq!(statuses(&report.messages[0]), [Status::Delivered]);
    assert_eq!(dumped(&sink, 1).await, ["x\n"]);
}

#[tokio::test]
async fn a_server_that_stops_reading_times_the_write_out() {
    let stalling = Script {
        stall_in_data: true,
        ..Script::default()
    };
    let (addr, _task) = scripted(stalling, 1).await;
    let d = delivery(Transport::Smtp, vec![tcp_host("mx.test", &[addr])]);
    // More than loopback's socket buffers hold.
    let big = "y".repeat(900) + "\r\n";
    let m = message(&["a@example.test"], &big.repeat(40_000));
    let started = Instant::now();
    let report = deliver(
        &d,
        &[m],
        &SmtpSettings {
            stage_timeout: |_| Duration::from_millis(300),
            ..settings()
        },
    )
    .await;

    assert_eq!(statuses(&report.messages[0]), [Status::Temporary]);
    assert!(report.messages[0].recipients[0].local);
    // One expiry, not one per write the client had queued.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}
