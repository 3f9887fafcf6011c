use super::*;
use crate::auth::Via;
use crate::auth::sasl::{SaslFailure, TLS_EXPORTER_LEN};
use crate::auth::store::UserRecord;
use crate::auth::testutil::{Fixture, ScramClient, add_app_password, binding, user};

const EXPORTER: [u8; TLS_EXPORTER_LEN] = [9u8; TLS_EXPORTER_LEN];

fn ip() -> IpAddr {
    "192.0.2.1".parse().unwrap()
}

async fn scram(
    f: &Fixture,
    mech: &str,
    b: ChannelBinding,
    client: &mut ScramClient,
) -> LoginOutcome {
    let mut x = f
        .accounts
        .start(mech, ip(), Service::Submission, b)
        .unwrap();
    let server_first = match x.step(Some(&client.first())).await {
        AuthStep::Challenge(server_first) => server_first,
        AuthStep::Done(o) => return o,
    };
    match x.step(Some(&client.final_message(&server_first))).await {
        AuthStep::Challenge(server_final) => {
            assert!(client.check_server_final(&server_final));
            // The 334 with server-final is answered with an empty line.
            match x.step(Some(b"")).await {
                AuthStep::Done(o) => o,
                other => panic!("{other:?}"),
            }
        }
        AuthStep::Done(o) => o,
    }
}

#[tokio::test]
async fn plain_and_login() {
    let f = Fixture::new(vec![user("alice", "correct horse")]);
    let mut x = f
        .accounts
        .start("plain", ip(), Service::Submission, ChannelBinding::NONE)
        .unwrap();
    assert_eq!(x.step(None).await, AuthStep::Challenge(Vec::new()));
    let AuthStep::Done(o) = x.step(Some(b"\0alice\0correct horse")).await else {
        panic!()
    };
    assert_eq!(o.reply().code, 235);
    assert_eq!(
        x.step(Some(b"again")).await,
        AuthStep::Done(LoginOutcome::Malformed)
    );

    let mut x = f
        .accounts
        .start("LOGIN", ip(), Service::Submission, ChannelBinding::NONE)
        .unwrap();
    assert_eq!(
        x.step(None).await,
        AuthStep::Challenge(b"Username:".to_vec())
    );
    assert_eq!(
        x.step(Some(b"alice")).await,
        AuthStep::Challenge(b"Password:".to_vec())
    );
    let AuthStep::Done(o) = x.step(Some(b"wrong")).await else {
        panic!()
    };
    assert_eq!((o.reply().code, o.reply().enhanced), (535, "5.7.8"));

    let mut x = f
        .accounts
        .start("PLAIN", ip(), Service::Submission, ChannelBinding::NONE)
        .unwrap();
    let AuthStep::Done(o) = x.step(Some(b"bob\0alice\0correct horse")).await else {
        panic!()
    };
    assert_eq!(o, LoginOutcome::Invalid, "authzid other than the login");
    let mut x = f
        .accounts
        .start("PLAIN", ip(), Service::Submission, ChannelBinding::NONE)
        .unwrap();
    let AuthStep::Done(o) = x.step(Some(b"no nul")).await else {
        panic!()
    };
    assert_eq!(o.reply().code, 501);
}

#[tokio::test]
async fn mechanisms_on_offer() {
    let f = Fixture::new(vec![]);
    assert_eq!(
        Accounts::mechanisms(false),
        ["SCRAM-SHA-256", "PLAIN", "LOGIN"]
    );
    assert_eq!(Accounts::mechanisms(true)[0], "SCRAM-SHA-256-PLUS");
    let err = f
        .accounts
        .start("CRAM-MD5", ip(), Service::Submission, ChannelBinding::NONE)
        .unwrap_err();
    assert_eq!(err, UnsupportedMechanism("CRAM-MD5".into()));
    // -PLUS needs the TLS exporter.
    assert!(
        f.accounts
            .start(
                "SCRAM-SHA-256-PLUS",
                ip(),
                Service::Submission,
                ChannelBinding::NONE
            )
            .is_err()
    );
    assert!(
        f.accounts
            .start(
                "SCRAM-SHA-256-PLUS",
                ip(),
                Service::Submission,
                binding(Some(EXPORTER), true)
            )
            .is_ok()
    );
}

#[tokio::test]
async fn scram_with_password_and_app_password() {
    let mut alice = user("alice", "correct horse");
    let phone = add_app_password(&mut alice, "phone");
    let f = Fixture::new(vec![alice]);
    let mut c = ScramClient::new("alice", "correct horse", "n,,", b"");
    let o = scram(&f, "SCRAM-SHA-256", ChannelBinding::NONE, &mut c).await;
    assert!(
        matches!(&o, LoginOutcome::Success(u) if u.via == Via::Password),
        "{o:?}"
    );
    let mut c = ScramClient::new("alice", &phone, "p=tls-exporter,,", &EXPORTER);
    let o = scram(
        &f,
        "SCRAM-SHA-256-PLUS",
        binding(Some(EXPORTER), true),
        &mut c,
    )
    .await;
    assert!(
        matches!(&o, LoginOutcome::Success(u) if u.via == Via::AppPassword("phone".into())),
        "{o:?}"
    );
    let mut c = ScramClient::new("alice", "wrong", "n,,", b"");
    assert_eq!(
        scram(&f, "SCRAM-SHA-256", ChannelBinding::NONE, &mut c).await,
        LoginOutcome::Invalid
    );
    // No argon2 anywhere in SCRAM.
    assert_eq!(f.accounts.hashes_computed(), 0);
    // Downgrade: -PLUS was offered, the client says "y".
    let mut c = ScramClient::new("alice", "correct horse", "y,,", b"");
    assert_eq!(
        scram(&f, "SCRAM-SHA-256", binding(Some(EXPORTER), true), &mut c).await,
        LoginOutcome::Invalid
    );
}

#[tokio::test]
async fn scram_refused_for_imported_and_unknown_users_alike() {
    let mut bob = UserRecord::new("bob");
    bob.password = Some(
        crate::auth::secret::StoredHash::parse("$6$saltsalt$qFmFH.bQmmtXzyBY0s9v7Oicd2z4XSIecDzlB5KiA2/jctKu9YterLp8wwnSq.qc.eoxqOmSuNp2xS0ktL3nh/").unwrap(),
    );
    let f = Fixture::new(vec![bob]);
    let mut c = ScramClient::new("bob", "password", "n,,", b"");
    assert_eq!(
        scram(&f, "SCRAM-SHA-256", ChannelBinding::NONE, &mut c).await,
        LoginOutcome::Invalid
    );
    // The decoy salt of an unknown login is the same every time.
    let salt_of = |f: &Fixture| {
        let accounts = f.accounts.clone();
        async move {
            let mut x = accounts
                .start(
                    "SCRAM-SHA-256",
                    ip(),
                    Service::Submission,
                    ChannelBinding::NONE,
                )
                .unwrap();
            let c = ScramClient::new("nobody", "x", "n,,", b"");
            let AuthStep::Challenge(sf) = x.step(Some(&c.first())).await else {
                panic!()
            };
            String::from_utf8(sf)
                .unwrap()
                .split(',')
                .nth(1)
                .unwrap()
                .to_string()
        }
    };
    let first = salt_of(&f).await;
    f.advance_secs(61);
    assert_eq!(first, salt_of(&f).await);
}

#[tokio::test]
async fn scram_is_throttled_before_the_server_first_message() {
    let f = Fixture::new(vec![user("alice", "correct horse")]);
    let mut c = ScramClient::new("alice", "wrong", "n,,", b"");
    assert_eq!(
        scram(&f, "SCRAM-SHA-256", ChannelBinding::NONE, &mut c).await,
        LoginOutcome::Invalid
    );
    let mut x = f
        .accounts
        .start(
            "SCRAM-SHA-256",
            "198.51.100.1".parse().unwrap(),
            Service::Submission,
            ChannelBinding::NONE,
        )
        .unwrap();
    let c = ScramClient::new("alice", "correct horse", "n,,", b"");
    assert_eq!(
        x.step(Some(&c.first())).await,
        AuthStep::Done(LoginOutcome::AccountThrottled)
    );
}

#[test]
fn failure_kinds_map_to_outcomes() {
    assert!(SaslFailure::InvalidProof.is_wrong_credentials());
    assert!(!SaslFailure::ChannelBindingDowngrade.is_wrong_credentials());
}

/// A TLS connection pair in memory (test CA from rcgen).
fn tls_pair(
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> (rustls::ClientConnection, rustls::ServerConnection) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["mx.example.test".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    let server_config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], key)
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let client_config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from("mx.example.test").unwrap();
    let mut client = rustls::ClientConnection::new(Arc::new(client_config), name).unwrap();
    let mut server = rustls::ServerConnection::new(Arc::new(server_config)).unwrap();
    while client.is_handshaking() || server.is_handshaking() {
        let mut buf = Vec::new();
        client.write_tls(&mut buf).unwrap();
        server.read_tls(&mut buf.as_slice()).unwrap();
        server.process_new_packets().unwrap();
        let mut buf = Vec::new();
        server.write_tls(&mut buf).unwrap();
        client.read_tls(&mut buf.as_slice()).unwrap();
        client.process_new_packets().unwrap();
    }
    (client, server)
}

#[tokio::test]
async fn scram_plus_over_a_real_tls_1_3_connection() {
    let (client, server) = tls_pair(&[&rustls::version::TLS13]);
    let exporter = tls_exporter(&server).expect("TLS 1.3 gives an exporter");
    // The client side derives the same 32 bytes (RFC 9266: empty context).
    let client_side = client
        .export_keying_material([0u8; 32], b"EXPORTER-Channel-Binding", Some(&[]))
        .unwrap();
    assert_eq!(exporter, client_side);
    let f = Fixture::new(vec![user("alice", "correct horse")]);
    let mut c = ScramClient::new("alice", "correct horse", "p=tls-exporter,,", &client_side);
    let o = scram(
        &f,
        "SCRAM-SHA-256-PLUS",
        binding(Some(exporter), true),
        &mut c,
    )
    .await;
    assert!(matches!(o, LoginOutcome::Success(_)), "{o:?}");
    // Another connection's binding (a man in the middle relaying): refused.
    let (other_client, _) = tls_pair(&[&rustls::version::TLS13]);
    let theirs = other_client
        .export_keying_material([0u8; 32], b"EXPORTER-Channel-Binding", Some(&[]))
        .unwrap();
    let mut c = ScramClient::new("alice", "correct horse", "p=tls-exporter,,", &theirs);
    let o = scram(
        &f,
        "SCRAM-SHA-256-PLUS",
        binding(Some(exporter), true),
        &mut c,
    )
    .await;
    assert_eq!(o, LoginOutcome::Invalid);
    // TLS 1.2: no exporter, so no -PLUS.
    let (_, server12) = tls_pair(&[&rustls::version::TLS12]);
    assert_eq!(tls_exporter(&server12), None);
}
