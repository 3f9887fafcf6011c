//! `tern user` end to end: the real binary on a temporary users file, its
//! exit statuses, and logins against what it wrote, through the library's
//! `Accounts` as the server will check them.

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use tern::auth::{Accounts, AuthStep, ChannelBinding, LoginOutcome, Service, Via};

fn tern(config: &Path, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tern"))
        .arg("user")
        .args(args)
        .arg("--config")
        .arg(config)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

async fn plain(accounts: &std::sync::Arc<Accounts>, user: &str, password: &str) -> LoginOutcome {
    let ip: IpAddr = "192.0.2.1".parse().unwrap();
    let mut x = accounts
        .start("PLAIN", ip, Service::Submission, ChannelBinding::NONE)
        .unwrap();
    match x
        .step(Some(format!("\0{user}\0{password}").as_bytes()))
        .await
    {
        AuthStep::Done(outcome) => outcome,
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn users_made_by_the_cli_log_in() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tern.toml");
    std::fs::write(
        &config,
        "data_dir = \"data\"\n[local]\ndomains = [\"example.test\"]\n",
    )
    .unwrap();
    let users_file = dir.path().join("data/users.toml");

    let o = tern(
        &config,
        &["add", "alice", "--address", "a.smith@example.test"],
        "correct horse\n",
    );
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    let mode = std::fs::metadata(&users_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(
        !std::fs::read_to_string(&users_file)
            .unwrap()
            .contains("correct horse")
    );

    // Usage errors and unknown users: 1.
    assert_eq!(
        code(&tern(&config, &["add", "alice"], "correct horse\n")),
        1
    );
    assert_eq!(code(&tern(&config, &["add", "bob"], "short\n")), 1);
    assert_eq!(code(&tern(&config, &["add", "bob"], "")), 1);
    assert_eq!(
        code(&tern(&config, &["passwd", "nobody"], "correct horse\n")),
        1
    );
    assert_eq!(code(&tern(&config, &["remove", "nobody"], "")), 1);
    assert_eq!(
        code(&tern(
            &config,
            &["app-password", "revoke", "alice", "none"],
            ""
        )),
        1
    );
    // An import file that cannot be read: 66.
    assert_eq!(
        code(&tern(&config, &["import", "/nonexistent/passwd"], "")),
        66
    );

    let o = tern(&config, &["app-password", "add", "alice", "phone"], "");
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    let phone = text(&o.stdout).trim().to_string();
    assert_eq!(phone.len(), 24, "{phone}");

    let passwd = dir.path().join("dovecot.passwd");
    std::fs::write(
        &passwd,
        "bob:{SHA512-CRYPT}$6$saltsalt$qFmFH.bQmmtXzyBY0s9v7Oicd2z4XSIecDzlB5KiA2/jctKu9YterLp8wwnSq.qc.eoxqOmSuNp2xS0ktL3nh/::::::\n",
    )
    .unwrap();
    let o = tern(&config, &["import", passwd.to_str().unwrap()], "");
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));

    let o = tern(&config, &["list", "--json"], "");
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(list[0]["name"], "alice");
    assert_eq!(list[0]["scram"], true);
    assert_eq!(list[0]["app_passwords"][0]["label"], "phone");
    assert_eq!(list[1]["password"], "sha-crypt");
    assert!(
        !text(&o.stdout).contains("argon2id$"),
        "no hashes in the listing"
    );

    let runtime = tern::config::load(&config).unwrap();
    let accounts = Accounts::open(&runtime.auth).unwrap();
    match plain(&accounts, "alice", "correct horse").await {
        LoginOutcome::Success(u) => assert_eq!(u.addresses, ["a.smith@example.test"]),
        other => panic!("{other:?}"),
    }
    match plain(&accounts, "alice", &phone).await {
        LoginOutcome::Success(u) => assert_eq!(u.via, Via::AppPassword("phone".into())),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        plain(&accounts, "bob", "password").await,
        LoginOutcome::Success(_)
    ));

    // Revoked: a fresh view of the file refuses it.
    let o = tern(&config, &["app-password", "revoke", "alice", "phone"], "");
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    let accounts = Accounts::open(&runtime.auth).unwrap();
    assert_eq!(
        plain(&accounts, "alice", &phone).await,
        LoginOutcome::Invalid
    );

    // A users file that does not parse: its line, exit 1; unreadable: 74.
    std::fs::write(&users_file, "[[user]]\nname = 5\n").unwrap();
    let o = tern(&config, &["list"], "");
    assert_eq!(code(&o), 1);
    assert!(
        text(&o.stderr).contains("users.toml line 2"),
        "{}",
        text(&o.stderr)
    );
    std::fs::write(
        &config,
        "data_dir = \"data\"\n[auth]\nusers_file = \"tern.toml/users.toml\"\n",
    )
    .unwrap();
    assert_eq!(code(&tern(&config, &["list"], "")), 74);
}

/// `auth.login` events: one per attempt, with client, mechanism, user as
/// given (escaped), outcome and which secret; never the secret itself.
#[tokio::test]
async fn every_attempt_is_logged_without_the_secret() {
    use std::sync::{Arc, Mutex};
    use tern::auth::secret::{HashParams, hash_secret};
    use tern::auth::store::{UserRecord, Users};

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);
    impl Write for Buffer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buffer = Buffer::default();
    let writer = buffer.clone();
    // The only subscriber of this test binary: events from the other test
    // land here too, told apart by their user names.
    let _ = tracing::subscriber::set_global_default(
        tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish(),
    );

    let dir = tempfile::tempdir().unwrap();
    let mut settings = tern::auth::AuthSettings::new(dir.path().join("users.toml"));
    settings.hash_params = HashParams::CHEAPEST;
    let mut logger = UserRecord::new("logger");
    logger.password = Some(hash_secret("correct horse", HashParams::CHEAPEST).unwrap());
    Users::edit(&settings.users_file, |u| {
        u.put(logger);
        Ok(())
    })
    .unwrap()
    .unwrap();
    let accounts = Accounts::open(&settings).unwrap();
    assert!(matches!(
        plain(&accounts, "logger", "correct horse").await,
        LoginOutcome::Success(_)
    ));
    assert_eq!(
        plain(&accounts, "log\"ger", "wrong horse").await,
        LoginOutcome::Invalid
    );

    let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("auth.login") && l.contains("user=log"))
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    for expected in [
        "client=192.0.2.1",
        "mechanism=PLAIN",
        "user=logger",
        "success",
        "via=password",
    ] {
        assert!(lines[0].contains(expected), "{expected}: {}", lines[0]);
    }
    for expected in ["user=log\\\"ger", "invalid", "unknown user"] {
        assert!(lines[1].contains(expected), "{expected}: {}", lines[1]);
    }
    for secret in ["correct horse", "wrong horse"] {
        assert!(!text.contains(secret), "{secret} in the log: {text}");
    }
}
