use super::*;
use crate::auth::secret::scram_keys;
use crate::auth::testutil::{ScramClient, binding};

const EXPORTER: [u8; 32] = [7u8; 32];

fn server(m: Mechanism, b: ChannelBinding) -> SaslServer {
    SaslServer::new(m, b, new_server_nonce())
}

fn creds(password: &str) -> ScramCredentials {
    let salt = ScramSalt {
        salt: b"0123456789abcdef".to_vec(),
        iterations: 4096,
    };
    ScramCredentials {
        keys: vec![scram_keys(password, &salt).unwrap()],
        salt,
    }
}

/// Runs a SCRAM exchange with the test client; returns the last step.
fn scram_run(
    m: Mechanism,
    b: ChannelBinding,
    client: &mut ScramClient,
    c: ScramCredentials,
) -> SaslStep {
    let mut s = server(m, b);
    match s.step(Some(&client.first())) {
        SaslStep::NeedScramCredentials { .. } => {}
        other => return other,
    }
    let SaslStep::Challenge(server_first) = s.scram_credentials(c) else {
        panic!("no server-first")
    };
    let step = s.step(Some(&client.final_message(&server_first)));
    if let SaslStep::ScramVerified { server_final, .. } = &step {
        assert!(client.check_server_final(server_final), "server signature");
        assert_eq!(s.step(Some(b"")), SaslStep::Completed);
    }
    step
}

#[test]
fn rfc7677_test_vector() {
    // RFC 7677 §3: user "user", password "pencil".
    let salt = ScramSalt {
        salt: B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap(),
        iterations: 4096,
    };
    let keys = scram_keys("pencil", &salt).unwrap();
    let mut s = SaslServer::new(
        Mechanism::ScramSha256,
        ChannelBinding::NONE,
        "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0".into(),
    );
    assert_eq!(
        s.step(Some(b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO")),
        SaslStep::NeedScramCredentials {
            login: "user".into()
        }
    );
    assert_eq!(
        s.scram_credentials(ScramCredentials { salt, keys: vec![keys] }),
        SaslStep::Challenge(
            b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
                .to_vec()
        )
    );
    let final_msg = b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    assert_eq!(
        s.step(Some(final_msg)),
        SaslStep::ScramVerified {
            login: "user".into(),
            key_index: 0,
            server_final: b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=".to_vec(),
        }
    );
    // SMTP: the client's empty answer to the 334 carrying server-final.
    assert_eq!(s.step(Some(b"")), SaslStep::Completed);
}

#[test]
fn scram_initial_challenge_is_empty_without_initial_response() {
    let mut s = server(Mechanism::ScramSha256, ChannelBinding::NONE);
    assert_eq!(s.step(None), SaslStep::Challenge(Vec::new()));
    let client = ScramClient::new("alice", "secret", "n,,", b"");
    assert!(matches!(
        s.step(Some(&client.first())),
        SaslStep::NeedScramCredentials { .. }
    ));
}

#[test]
fn scram_wrong_password_and_several_keys() {
    let mut client = ScramClient::new("alice", "wrong", "n,,", b"");
    assert_eq!(
        scram_run(
            Mechanism::ScramSha256,
            ChannelBinding::NONE,
            &mut client,
            creds("right")
        ),
        SaslStep::Failed(SaslFailure::InvalidProof)
    );
    // The second key (an app password's) matches.
    let mut c = creds("password-key");
    c.keys.push(scram_keys("app-key", &c.salt).unwrap());
    let mut client = ScramClient::new("alice", "app-key", "n,,", b"");
    let step = scram_run(
        Mechanism::ScramSha256,
        ChannelBinding::NONE,
        &mut client,
        c.clone(),
    );
    assert!(
        matches!(step, SaslStep::ScramVerified { key_index: 1, .. }),
        "{step:?}"
    );
    // No keys at all (unknown user): fails like a wrong password.
    c.keys.clear();
    let mut client = ScramClient::new("alice", "app-key", "n,,", b"");
    assert_eq!(
        scram_run(Mechanism::ScramSha256, ChannelBinding::NONE, &mut client, c),
        SaslStep::Failed(SaslFailure::InvalidProof)
    );
}

#[test]
fn scram_plus_binds_to_the_tls_exporter() {
    let b = binding(Some(EXPORTER), true);
    let mut client = ScramClient::new("alice", "pw", "p=tls-exporter,,", &EXPORTER);
    let step = scram_run(Mechanism::ScramSha256Plus, b, &mut client, creds("pw"));
    assert!(matches!(step, SaslStep::ScramVerified { .. }), "{step:?}");
    // Another connection's exporter (a relayed exchange): refused.
    let mut client = ScramClient::new("alice", "pw", "p=tls-exporter,,", &[8u8; 32]);
    assert_eq!(
        scram_run(Mechanism::ScramSha256Plus, b, &mut client, creds("pw")),
        SaslStep::Failed(SaslFailure::ChannelBindingMismatch)
    );
    // -PLUS without binding, or another binding type.
    for header in ["n,,", "y,,", "p=tls-unique,,", "p=tls-server-end-point,,"] {
        let mut client = ScramClient::new("alice", "pw", header, &EXPORTER);
        assert_eq!(
            scram_run(Mechanism::ScramSha256Plus, b, &mut client, creds("pw")),
            SaslStep::Failed(SaslFailure::ChannelBindingUnsupported),
            "{header}"
        );
    }
}

#[test]
fn scram_y_flag_is_a_downgrade_when_plus_was_offered() {
    // RFC 5802 §6: "y" means the client could bind but thinks we cannot.
    let mut client = ScramClient::new("alice", "pw", "y,,", b"");
    assert_eq!(
        scram_run(
            Mechanism::ScramSha256,
            binding(Some(EXPORTER), true),
            &mut client,
            creds("pw")
        ),
        SaslStep::Failed(SaslFailure::ChannelBindingDowngrade)
    );
    // Not offered (no TLS, or -PLUS not configured): "y" is fine.
    let mut client = ScramClient::new("alice", "pw", "y,,", b"");
    let step = scram_run(
        Mechanism::ScramSha256,
        ChannelBinding::NONE,
        &mut client,
        creds("pw"),
    );
    assert!(matches!(step, SaslStep::ScramVerified { .. }), "{step:?}");
    // "p=" with the non-PLUS mechanism is a client error.
    let mut client = ScramClient::new("alice", "pw", "p=tls-exporter,,", &EXPORTER);
    assert_eq!(
        scram_run(
            Mechanism::ScramSha256,
            binding(Some(EXPORTER), true),
            &mut client,
            creds("pw")
        ),
        SaslStep::Failed(SaslFailure::ChannelBindingUnsupported)
    );
}

#[test]
fn scram_gs2_header_must_match_in_the_final_message() {
    // Client-first says "n", client-final's c= says "y": mismatch.
    let mut s = server(Mechanism::ScramSha256, ChannelBinding::NONE);
    let mut client = ScramClient::new("alice", "pw", "n,,", b"");
    s.step(Some(&client.first()));
    let SaslStep::Challenge(sf) = s.scram_credentials(creds("pw")) else {
        panic!()
    };
    client.gs2_header = "y,,".into();
    assert_eq!(
        s.step(Some(&client.final_message(&sf))),
        SaslStep::Failed(SaslFailure::ChannelBindingMismatch)
    );
}

#[test]
fn scram_authzid_escapes_nonce_and_syntax() {
    let mut client = ScramClient::new("a,b=c", "pw", "n,a=a=2Cb=3Dc,", b"");
    let step = scram_run(
        Mechanism::ScramSha256,
        ChannelBinding::NONE,
        &mut client,
        creds("pw"),
    );
    assert!(
        matches!(&step, SaslStep::ScramVerified { login, .. } if login == "a,b=c"),
        "{step:?}"
    );
    let mut client = ScramClient::new("alice", "pw", "n,a=bob,", b"");
    assert_eq!(
        scram_run(
            Mechanism::ScramSha256,
            ChannelBinding::NONE,
            &mut client,
            creds("pw")
        ),
        SaslStep::Failed(SaslFailure::AuthzidRefused)
    );
    for bad in [
        &b"n,,m=ext,n=alice,r=abc"[..],
        b"n,,n=alice",
        b"n,,n=al=ice,r=abc",
        b"n,,n=,r=abc",
        b"x,,n=alice,r=abc",
        b"n,n=alice,r=abc",
        b"n,,n=alice,r=a,bc\xff",
        b"\xff",
    ] {
        let mut s = server(Mechanism::ScramSha256, ChannelBinding::NONE);
        assert!(
            matches!(
                s.step(Some(bad)),
                SaslStep::Failed(SaslFailure::Malformed(_))
            ),
            "{}",
            String::from_utf8_lossy(bad)
        );
    }
    // A final message with another nonce.
    let mut s = server(Mechanism::ScramSha256, ChannelBinding::NONE);
    let mut client = ScramClient::new("alice", "pw", "n,,", b"");
    s.step(Some(&client.first()));
    let SaslStep::Challenge(sf) = s.scram_credentials(creds("pw")) else {
        panic!()
    };
    let forged = String::from_utf8(sf).unwrap().replacen("r=", "r=X", 1);
    assert_eq!(
        s.step(Some(&client.final_message(forged.as_bytes()))),
        SaslStep::Failed(SaslFailure::NonceMismatch)
    );
}

#[test]
fn scram_ack_must_be_empty_and_steps_in_order() {
    let mut s = server(Mechanism::ScramSha256, ChannelBinding::NONE);
    let mut client = ScramClient::new("alice", "pw", "n,,", b"");
    s.step(Some(&client.first()));
    // A response while we wait for the caller's credentials.
    let SaslStep::Challenge(sf) = s.scram_credentials(creds("pw")) else {
        panic!()
    };
    assert!(matches!(
        s.step(Some(&client.final_message(&sf))),
        SaslStep::ScramVerified { .. }
    ));
    assert!(matches!(
        s.step(Some(b"x")),
        SaslStep::Failed(SaslFailure::Malformed(_))
    ));
    let mut s = server(Mechanism::Plain, ChannelBinding::NONE);
    assert_eq!(
        s.scram_credentials(creds("pw")),
        SaslStep::Failed(SaslFailure::OutOfOrder)
    );
}

#[test]
fn plain() {
    let mut s = server(Mechanism::Plain, ChannelBinding::NONE);
    assert_eq!(s.step(None), SaslStep::Challenge(Vec::new()));
    assert_eq!(
        s.step(Some(b"\0alice\0s3cret pw")),
        SaslStep::CheckPassword {
            login: "alice".into(),
            password: Secret::new("s3cret pw")
        }
    );
    let mut s = server(Mechanism::Plain, ChannelBinding::NONE);
    assert!(matches!(
        s.step(Some(b"alice\0alice\0pw")),
        SaslStep::CheckPassword { .. }
    ));
    let mut s = server(Mechanism::Plain, ChannelBinding::NONE);
    assert_eq!(
        s.step(Some(b"bob\0alice\0pw")),
        SaslStep::Failed(SaslFailure::AuthzidRefused)
    );
    let long_password = format!("\0alice\0{}", "x".repeat(MAX_SECRET_LEN + 1));
    for bad in [
        &b"\0alice"[..],
        b"\0alice\0",
        b"\0\0pw",
        b"\0alice\0pw\0",
        b"\0al\xffice\0pw",
        long_password.as_bytes(),
    ] {
        let mut s = server(Mechanism::Plain, ChannelBinding::NONE);
        assert!(
            matches!(
                s.step(Some(bad)),
                SaslStep::Failed(SaslFailure::Malformed(_))
            ),
            "{bad:?}"
        );
    }
    // The secret never shows in Debug output.
    let step = server(Mechanism::Plain, ChannelBinding::NONE).step(Some(b"\0alice\0hunter2"));
    assert!(!format!("{step:?}").contains("hunter2"));
}

#[test]
fn login() {
    let mut s = server(Mechanism::Login, ChannelBinding::NONE);
    assert_eq!(s.step(None), SaslStep::Challenge(b"Username:".to_vec()));
    assert_eq!(
        s.step(Some(b"alice")),
        SaslStep::Challenge(b"Password:".to_vec())
    );
    assert_eq!(
        s.step(Some(b"pw")),
        SaslStep::CheckPassword {
            login: "alice".into(),
            password: Secret::new("pw")
        }
    );
    // The user name as initial response.
    let mut s = server(Mechanism::Login, ChannelBinding::NONE);
    assert_eq!(
        s.step(Some(b"alice")),
        SaslStep::Challenge(b"Password:".to_vec())
    );
    let mut s = server(Mechanism::Login, ChannelBinding::NONE);
    assert!(matches!(
        s.step(Some(b"")),
        SaslStep::Failed(SaslFailure::Malformed(_))
    ));
    let mut s = server(Mechanism::Login, ChannelBinding::NONE);
    s.step(None);
    s.step(Some(b"alice"));
    assert!(matches!(
        s.step(Some(b"")),
        SaslStep::Failed(SaslFailure::Malformed(_))
    ));
}

#[test]
fn mechanism_names() {
    assert_eq!(
        Mechanism::from_name("scram-sha-256-plus"),
        Some(Mechanism::ScramSha256Plus)
    );
    assert_eq!(Mechanism::from_name("PLAIN"), Some(Mechanism::Plain));
    assert_eq!(Mechanism::from_name("CRAM-MD5"), None);
}

/// Cross-check with an independent SCRAM client: Python's `scramp`, when
/// importable (`pip install scramp`); skipped (passes, says so) otherwise.
/// scramp refuses tls-exporter by name, so for -PLUS the script lets it
/// through: the binding data and gs2 header are then scramp's own.
#[test]
fn scramp_cross_check() {
    let probe = std::process::Command::new("python3")
        .args(["-c", "import scramp"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!("SKIPPED scramp_cross_check: python3 with scramp not available");
        return;
    }
    const SCRIPT: &str = r#"
import sys, base64, scramp, scramp.core as core
core.CbName.SUPPORTED_TYPES = frozenset(core.CbName.SUPPORTED_TYPES | {"tls-exporter"})
core.CbName.UNSUPPORTED_TYPES = frozenset()
mech, user, password = sys.argv[1], sys.argv[2], sys.argv[3]
cb = ("tls-exporter", bytes([7]) * 32) if mech.endswith("PLUS") else None
c = scramp.ScramClient([mech], user, password, channel_binding=cb)
print(base64.b64encode(c.get_client_first().encode()).decode(), flush=True)
c.set_server_first(base64.b64decode(sys.stdin.readline()).decode())
print(base64.b64encode(c.get_client_final().encode()).decode(), flush=True)
c.set_server_final(base64.b64decode(sys.stdin.readline()).decode())
print("ok", flush=True)
"#;
    for (mech, user, password, key_password, expect_ok) in [
        (Mechanism::ScramSha256, "alice", "pencil", "pencil", true),
        (
            Mechanism::ScramSha256Plus,
            "alice",
            "pencil",
            "pencil",
            true,
        ),
        (Mechanism::ScramSha256, "bob", "I\u{00AD}X", "IX", true),
        (Mechanism::ScramSha256, "alice", "wrong", "pencil", false),
    ] {
        use std::io::{BufRead, BufReader, Write};
        let mut child = std::process::Command::new("python3")
            .args(["-c", SCRIPT, mech.name(), user, password])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut read = || B64.decode(lines.next().unwrap().unwrap()).unwrap();
        let mut s = server(mech, binding(Some(EXPORTER), true));
        let first = read();
        assert_eq!(
            s.step(Some(&first)),
            SaslStep::NeedScramCredentials { login: user.into() }
        );
        let SaslStep::Challenge(sf) = s.scram_credentials(creds(key_password)) else {
            panic!()
        };
        writeln!(stdin, "{}", B64.encode(&sf)).unwrap();
        let step = s.step(Some(&read()));
        match step {
            SaslStep::ScramVerified { server_final, .. } => {
                assert!(expect_ok, "{mech} {password}: accepted");
                writeln!(stdin, "{}", B64.encode(&server_final)).unwrap();
                drop(stdin);
                assert_eq!(
                    lines.next().unwrap().unwrap(),
                    "ok",
                    "scramp checked our signature"
                );
            }
            other => {
                assert!(!expect_ok, "{mech}: {other:?}");
                assert_eq!(other, SaslStep::Failed(SaslFailure::InvalidProof));
                drop(stdin);
            }
        }
        let _ = child.wait();
    }
}

mod prop {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever the client sends, in however many steps, no mechanism
        /// panics, and once an exchange has ended it stays ended.
        #[test]
        fn any_input_is_answered(
            mech in 0usize..4,
            plus_advertised: bool,
            exporter: bool,
            give_credentials: bool,
            steps in proptest::collection::vec(proptest::option::of(proptest::collection::vec(any::<u8>(), 0..80)), 1..6),
        ) {
            let m = Mechanism::ALL[mech];
            let b = binding(exporter.then_some(EXPORTER), plus_advertised);
            let mut s = server(m, b);
            let mut ended = false;
            for response in &steps {
                let step = s.step(response.as_deref());
                if ended {
                    prop_assert!(matches!(step, SaslStep::Failed(_)), "{step:?} after the end");
                }
                match step {
                    SaslStep::NeedScramCredentials { .. } if give_credentials => {
                        let _ = s.scram_credentials(creds("pw"));
                    }
                    SaslStep::Challenge(_) => {}
                    _ => ended = true,
                }
            }
        }

        /// Printable SCRAM-looking messages (the interesting corner) too.
        #[test]
        fn scram_like_text_is_answered(first in "[nyp=a-z,]{0,12}n=[a-z=,2CD3]{0,8},r=[!-~]{0,10}", last in "c=[A-Za-z0-9+/=]{0,12},r=[!-~]{0,30},p=[A-Za-z0-9+/=]{0,50}") {
            let mut s = server(Mechanism::ScramSha256, binding(Some(EXPORTER), true));
            if let SaslStep::NeedScramCredentials { .. } = s.step(Some(first.as_bytes())) {
                let _ = s.scram_credentials(creds("pw"));
                let step = s.step(Some(last.as_bytes()));
                prop_assert!(matches!(step, SaslStep::Failed(_)), "{step:?}");
            }
        }
    }
}
