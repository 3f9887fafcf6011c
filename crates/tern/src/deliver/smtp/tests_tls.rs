//! STARTTLS against an in-process rustls SMTP server on loopback, with a
//! test CA made by rcgen: each mode's success and failure, the plain-text
//! retry after a failed opportunistic handshake, and response injection
//! after the 220 to STARTTLS.

use super::tests::{answered_by, delivery, message, settings, statuses, tcp_host};
use super::*;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

/// A test CA and a server certificate it issued.
struct Pki {
    /// The CA certificate, PEM.
    ca_pem: String,
    acceptor: TlsAcceptor,
}

fn pki(server_names: &[&str]) -> Pki {
    pki_with(
        server_names,
        &[&rustls::version::TLS13, &rustls::version::TLS12],
    )
}

fn pki_with(server_names: &[&str], versions: &[&'static rustls::SupportedProtocolVersion]) -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Tern test CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();

    let names: Vec<String> = server_names.iter().map(|n| n.to_string()).collect();
    let mut leaf_params = CertificateParams::new(names).unwrap();
    leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = leaf_params.signed_by(&leaf_key, &ca).unwrap();

    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(versions)
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![leaf.der().clone(), ca.der().clone()], key)
    .unwrap();
    Pki {
        ca_pem: ca.pem(),
        acceptor: TlsAcceptor::from(Arc::new(config)),
    }
}

/// What the server does about STARTTLS.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Starttls {
    /// Offers it and completes the handshake.
    Handshake,
    /// Does not offer it.
    NotOffered,
    /// Answers 220, then sends plain text in place of its ServerHello.
    Garbage,
    /// Sends a second, plain-text reply right behind its 220.
    Inject,
}

/// What one connection to the test server saw.
#[derive(Debug, Default)]
struct Seen {
    /// Each content received, and whether it came over TLS.
    contents: Vec<(bool, Vec<u8>)>,
    /// For each AUTH command, whether it came over TLS.
    auth: Vec<bool>,
}

/// A test SMTP server on 127.0.0.1 (any free port) for `connections`
/// connections in turn.
async fn tls_server(
    acceptor: TlsAcceptor,
    starttls: Starttls,
    connections: usize,
) -> (SocketAddr, JoinHandle<Vec<Seen>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut all = Vec::new();
        for _ in 0..connections {
            let (stream, _) = listener.accept().await.unwrap();
            all.push(serve(Box::new(stream), &acceptor, starttls).await);
        }
        all
    });
    (addr, task)
}

async fn serve(stream: Stream, acceptor: &TlsAcceptor, starttls: Starttls) -> Seen {
    let mut seen = Seen::default();
    let mut tls = false;
    let mut stream = BufReader::new(stream);
    if stream
        .write_all(b"220 mx.tern.test ESMTP\r\n")
        .await
        .is_err()
    {
        return seen;
    }
    loop {
        let mut line = Vec::new();
        if stream.read_until(b'\n', &mut line).await.unwrap_or(0) == 0 {
            return seen;
        }
        let command = String::from_utf8_lossy(&line).to_ascii_uppercase();
        let reply: &str = if command.starts_with("EHLO") {
            if !tls && starttls != Starttls::NotOffered {
                "250-mx.tern.test\r\n250-PIPELINING\r\n250-STARTTLS\r\n250 AUTH PLAIN\r\n"
            } else {
                "250-mx.tern.test\r\n250-PIPELINING\r\n250 AUTH PLAIN\r\n"
            }
        } else if command.starts_with("STARTTLS") {
            match starttls {
                Starttls::Handshake | Starttls::NotOffered => {
                    let ready = b"220 2.0.0 ready to start TLS\r\n";
                    if stream.write_all(ready).await.is_err() || !stream.buffer().is_empty() {
                        return seen;
                    }
                    match acceptor.accept(stream.into_inner()).await {
                        Ok(secure) => stream = BufReader::new(Box::new(secure) as Stream),
                        // The client refused our certificate.
                        Err(_) => return seen,
                    }
                    tls = true;
                    continue;
                }
                Starttls::Garbage => {
                    let _ = stream.write_all(b"220 2.0.0 ready to start TLS\r\n").await;
                    // Its ClientHello first, so the garbage meets the
                    // handshake rather than the SMTP reader.
                    let mut hello = [0u8; 1];
                    let _ = stream.read(&mut hello).await;
                    let _ = stream.write_all(b"this is not TLS\r\n").await;
                    drain(&mut stream).await;
                    return seen;
                }
                Starttls::Inject => {
                    let _ = stream
                        .write_all(b"220 2.0.0 ready to start TLS\r\n250 2.0.0 injected\r\n")
                        .await;
                    drain(&mut stream).await;
                    return seen;
                }
            }
        } else if command.starts_with("AUTH") {
            seen.auth.push(tls);
            "235 2.7.0 authenticated\r\n"
        } else if command.starts_with("DATA") {
            if stream.write_all(b"354 go on\r\n").await.is_err() {
                return seen;
            }
            let mut content = Vec::new();
            loop {
                let mut line = Vec::new();
                if stream.read_until(b'\n', &mut line).await.unwrap_or(0) == 0 {
                    return seen;
                }
                if line == b".\r\n" {
                    break;
                }
                content.extend_from_slice(&line);
            }
            seen.contents.push((tls, content));
            "250 2.0.0 queued\r\n"
        } else if command.starts_with("QUIT") {
            let _ = stream.write_all(b"221 2.0.0 bye\r\n").await;
            let _ = stream.shutdown().await;
            return seen;
        } else {
            "250 2.0.0 ok\r\n"
        };
        if stream.write_all(reply.as_bytes()).await.is_err() {
            return seen;
        }
    }
}

/// Reads until the client closes, so that it reads what we sent before it
/// sees the connection reset.
async fn drain(stream: &mut BufReader<Stream>) {
    let mut buf = [0u8; 1024];
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 {
            return;
        }
    }
}

fn received(seen: &[Seen]) -> Vec<(bool, Vec<u8>)> {
    seen.iter().flat_map(|s| s.contents.clone()).collect()
}

/// Writes `pki`'s CA certificate to a file in `dir`.
fn ca_file(pki: &Pki, dir: &tempfile::TempDir) -> PathBuf {
    let path = dir.path().join("ca.pem");
    std::fs::write(&path, &pki.ca_pem).unwrap();
    path
}

#[tokio::test]
async fn opportunistic_delivers_over_tls_and_authenticates_only_inside_it() {
    let pki = pki(&["mx.tern.test"]);
    let (addr, task) = tls_server(pki.acceptor.clone(), Starttls::Handshake, 1).await;
    let d = delivery(Transport::Smtp, vec![tcp_host("mx.tern.test", &[addr])]);
    let with_credentials = SmtpSettings {
        tls: TlsMode::Opportunistic,
        credentials: Some(Credentials {
            username: "tern".into(),
            password: "secret".into(),
        }),
        ..settings()
    };
    let report = deliver(
        &d,
        &[message(&["a@example.test"], "over tls\r\n")],
        &with_credentials,
    )
    .await;

    assert_eq!(statuses(&report.messages[0]), [Status::Delivered]);
    assert_eq!(report.connections.len(), 1);
    let tls = report.connections[0].tls.clone().unwrap_or_default();
    assert!(tls.starts_with("TLSv1.3 TLS13_"), "{tls:?}");
    let seen = task.await.unwrap();
    assert_eq!(received(&seen), [(true, b"over tls\r\n".to_vec())]);
    assert_eq!(seen[0].auth, [true], "AUTH once, and over TLS");
}

#[tokio::test]
async fn require_over_tls_1_2_reports_the_version() {
    let pki = pki_with(&["mx.tern.test"], &[&rustls::version::TLS12]);
    let (addr, task) = tls_server(pki.acceptor.clone(), Starttls::Handshake, 1).await;
    let d = delivery(Transport::Smtp, vec![tcp_host("198.51.100.1", &[addr])]);
    let require = SmtpSettings {
        tls: TlsMode::Require,
        ..settings()
    };
    let report = deliver(&d, &[message(&["a@example.test"], "x\r\n")], &require).await;

    assert_eq!(statuses(&report.messages[0]), [Status::Delivered]);
    let tls = report.connections[0].tls.clone().unwrap_or_default();
    assert!(tls.starts_with("TLSv1.2 TLS_ECDHE_"), "{tls:?}");
    assert_eq!(received(&task.await.unwrap()).len(), 1);
}

#[tokio::test]
async fn verify_succeeds_with_the_test_ca_and_the_routed_name() {
    let pki = pki(&["mx.tern.test"]);
    let dir = tempfile::tempdir().unwrap();
    let (addr, task) = tls_server(pki.acceptor.clone(), Starttls::Handshake, 1).await;
    let d = delivery(Transport::Smtp, vec![tcp_host("MX.tern.test.", &[addr])]);
    let verify = SmtpSettings {
        tls: TlsMode::Verify,
        tls_ca_file: Some(ca_file(&pki, &dir)),
        ..settings()
    };
    verify.prepare_tls().unwrap();
    let report = deliver(&d, &[message(&["a@example.test"], "verified\r\n")], &verify).await;

    assert_eq!(statuses(&report.messages[0]), [Status::Delivered]);
    assert!(report.connections[0].tls.is_some());
    assert_eq!(
        received(&task.await.unwrap()),
        [(true, b"verified\r\n".to_vec())]
    );
}

#[tokio::test]
async fn verify_refuses_a_certificate_for_another_name() {
    let pki = pki(&["mx.tern.test"]);
    let dir = tempfile::tempdir().unwrap();
    let (addr, task) = tls_server(pki.acceptor.clone(), Starttls::Handshake, 1).await;
    let d = delivery(Transport::Smtp, vec![tcp_host("other.tern.test", &[addr])]);
    let verify = SmtpSettings {
        tls: TlsMode::Verify,
        tls_ca_file: Some(ca_file(&pki, &dir)),
        ..settings()
    };
    let report = deliver(&d, &[message(&["a@example.test"], "x\r\n")], &verify).await;

    let rcpt = &report.messages[0].recipients[0];
    assert_eq!(rcpt.status, Status::Temporary);
    assert_eq!(rcpt.answered_by, None);
    let reason = rcpt.reply.to_string();
    assert!(reason.starts_with("451 4.7.5 "), "{reason}");
    assert!(reason.contains("certificate"), "{reason}");
    // No plain-text retry under Verify.
    assert_eq!(report.connections.len(), 1);
    assert_eq!(report.connections[0].tls, None);
    assert!(received(&task.await.unwrap()).is_empty());
}

#[tokio::test]
async fn verify_without_the_ca_refuses_the_test_certificate() {
    let pki = pki(&["mx.tern.test"]);
    let (addr, task) = tls_server(pki.acceptor.clone(), Starttls::Handshake, 1).await;
    let d = delivery(Transport::Smtp, vec![tcp_host("mx.tern.test", &[addr])]);
    let verify = SmtpSettings {
        tls: TlsMode::Verify,
        ..settings()
    };
    let report = deliver(&d, &[message(&["a@example.test"], "x\r\n")], &verify).await;

    let rcpt = &report.messages[0].recipients[0];
    assert_eq!(rcpt.status, Status::Temporary);
    assert!(
        rcpt.reply.to_string().contains("certificate"),
        "{}",
        rcpt.reply
    );
    assert!(received(&task.await.unwrap()).is_empty());
}

#[tokio::test]
async fn require_without_starttls_offered_fails_and_the_next_host_is_tried() {
    let pki = pki(&["b.mx.tern.test"]);
    let (plain, plain_task) = tls_server(pki.acceptor.clone(), Starttls::NotOffered, 1).await;
    let (secure, secure_task) = tls_server(pki.acceptor.clone(), Starttls::Handshake, 1).await;
    let d = delivery(
        Transport::Smtp,
        vec![
            tcp_host("a.mx.tern.test", &[plain]),
            tcp_host("b.mx.tern.test", &[secure]),
        ],
    );
    let require = SmtpSettings {
        tls: TlsMode::Require,
        ..settings()
    };
    let report = deliver(&d, &[message(&["a@example.test"], "x\r\n")], &require).await;

    assert_eq!(statuses(&report.messages[0]), [Status::Delivered]);
    assert_eq!(answered_by(&report.messages[0]), [Some("b.mx.tern.test")]);
    assert_eq!(report.connections.len(), 2);
    let refused = report.connections[0].failure.clone().unwrap();
    assert!(refused.local);
    assert!(
        refused
            .reply
            .to_string()
            .contains("TLS required but not offered"),
        "{}",
        refused.reply
    );
    assert!(report.connections[1].tls.is_some());
    assert!(received(&plain_task.await.unwrap()).is_empty());
    assert_eq!(received(&secure_task.await.unwrap()).len(), 1);

    // Alone, the same host's refusal is the recipients' reason.
    let (plain, _task) = tls_server(pki.acceptor.clone(), Starttls::NotOffered, 1).await;
    let d = delivery(Transport::Smtp, vec![tcp_host("a.mx.tern.test", &[plain])]);
    let report = deliver(&d, &[message(&["a@example.test"], "x\r\n")], &require).await;
    let rcpt = &report.messages[0].recipients[0];
    assert_eq!(rcpt.status, Status::Temporary);
    assert!(
        rcpt.reply
            .to_string()
            .contains("TLS required but not offered"),
        "{}",
        rcpt.reply
    );
}

#[tokio::test]
async fn opportunistic_after_a_failed_handshake_delivers_in_plain_text_on_the_retry() {
    let pki = pki(&["mx.tern.test"]);
    let (addr, task) = tls_server(pki.acceptor.clone(), Starttls::Garbage, 2).await;
    let d = delivery(Transport::Smtp, vec![tcp_host("mx.tern.test", &[addr])]);
    let opportunistic = SmtpSettings {
        tls: TlsMode::Opportunistic,
        ..settings()
    };
    let report = deliver(
        &d,
        &[message(&["a@example.test"], "plain\r\n")],
        &opportunistic,
    )
    .await;

    assert_eq!(statuses(&report.messages[0]), [Status::Delivered]);
    assert_eq!(report.connections.len(), 2);
    let failed = report.connections[0].failure.clone().unwrap();
    assert!(
        failed
            .reply
            .to_string()
            .starts_with("451 4.7.5 TLS handshake"),
        "{}",
        failed.reply
    );
    assert_eq!(report.connections[1].failure, None);
    assert_eq!(report.connections[1].tls, None);
    assert_eq!(
        received(&task.await.unwrap()),
        [(false, b"plain\r\n".to_vec())]
    );
}

#[tokio::test]
async fn require_after_a_failed_handshake_does_not_fall_back() {
    let pki = pki(&["mx.tern.test"]);
    let (addr, task) = tls_server(pki.acceptor.clone(), Starttls::Garbage, 1).await;
    let d = delivery(Transport::Smtp, vec![tcp_host("mx.tern.test", &[addr])]);
    let require = SmtpSettings {
        tls: TlsMode::Require,
        ..settings()
    };
    let report = deliver(&d, &[message(&["a@example.test"], "x\r\n")], &require).await;

    assert_eq!(statuses(&report.messages[0]), [Status::Temporary]);
    assert_eq!(report.connections.len(), 1);
    assert!(received(&task.await.unwrap()).is_empty());
}

#[tokio::test]
async fn a_reply_injected_behind_the_starttls_220_fails_the_connection() {
    let pki = pki(&["mx.tern.test"]);
    let (addr, task) = tls_server(pki.acceptor.clone(), Starttls::Inject, 1).await;
    let d = delivery(Transport::Smtp, vec![tcp_host("mx.tern.test", &[addr])]);
    let opportunistic = SmtpSettings {
        tls: TlsMode::Opportunistic,
        ..settings()
    };
    let report = deliver(&d, &[message(&["a@example.test"], "x\r\n")], &opportunistic).await;

    let rcpt = &report.messages[0].recipients[0];
    assert_eq!(rcpt.status, Status::Temporary);
    assert_eq!(
        rcpt.reply.enhanced.map(|e| e.to_string()),
        Some("4.5.0".into()),
        "{}",
        rcpt.reply
    );
    // Not a handshake failure: no plain-text retry for an injecting server.
    assert_eq!(report.connections.len(), 1);
    assert!(received(&task.await.unwrap()).is_empty());
}

#[test]
fn delivery_is_send_for_the_queue_to_spawn() {
    fn is_send<T: Send>(_: &T) {}
    let d = delivery(Transport::Smtp, Vec::new());
    let s = settings();
    let attempt = deliver(&d, &[], &s);
    is_send(&attempt);
}
