use super::*;
use crate::auth::testutil::user;
use std::path::Path;

const CONFIG: &str = r#"
hostname = "mx.example.test"
data_dir = "/var/lib/tern"
[local]
domains = ["example.test"]
[[user]]
name = "alice"
addresses = ["alice@example.test"]
[aliases]
"team@example.test" = ["alice"]
"#;

fn runtime(extra: &str) -> Result<Runtime, Vec<crate::config::ConfigError>> {
    crate::config::parse(&format!("{CONFIG}{extra}"), Path::new("/etc/tern"))
}

#[test]
fn auth_config_defaults() {
    let rt = runtime("").unwrap();
    assert_eq!(rt.auth.users_file, Path::new("/var/lib/tern/users.toml"));
    assert_eq!(rt.auth.limits, LoginLimits::default());
    assert_eq!(rt.auth.cache_ttl, DEFAULT_CACHE_TTL);
    assert!(rt.auth.hash_concurrency >= 1);
    assert_eq!(rt.auth.hash_params, HashParams::DEFAULT);
    // The example config documents the same defaults.
    let example = include_str!("../../../../tern.example.toml");
    let rt = crate::config::parse(example, Path::new("/nonexistent")).unwrap();
    assert_eq!(rt.auth.limits, LoginLimits::default());
    assert_eq!(rt.auth.cache_ttl, DEFAULT_CACHE_TTL);
}

#[test]
fn auth_config_keys() {
    let rt = runtime(
        "[auth]\nusers_file = \"logins.toml\"\nmax_failures_per_ip = 3\nfailure_window = \"1h\"\n\
         account_retry_interval = \"0s\"\ncache_ttl = \"0s\"\nhash_concurrency = 4\n",
    )
    .unwrap();
    assert_eq!(rt.auth.users_file, Path::new("/etc/tern/logins.toml"));
    assert_eq!(rt.auth.limits.max_failures_per_ip, 3);
    assert_eq!(rt.auth.limits.window, Duration::from_secs(3600));
    assert_eq!(rt.auth.limits.account_retry_interval, Duration::ZERO);
    assert_eq!(rt.auth.cache_ttl, Duration::ZERO);
    assert_eq!(rt.auth.hash_concurrency, 4);
    let errors = runtime(
        "[auth]\nmax_failures_per_ip = 0\nlockout = \"soon\"\nmax_tracked = 10\nhash_concurrency = 1000\nusers = 1\n",
    )
    .unwrap_err();
    // The unknown key first, then what validation finds in the rest.
    assert_eq!(errors[0].key, "auth.users", "{errors:?}");
    assert_eq!(errors[0].line, Some(16), "{errors:?}");
    assert_eq!(errors[1].line, Some(12), "{errors:?}");
    assert!(errors.len() > 1, "{errors:?}");
    let errors =
        runtime("[auth]\nmax_failures_per_ip = 0\nlockout = \"soon\"\nmax_tracked = 10\nhash_concurrency = 1000\n").unwrap_err();
    let keys: Vec<_> = errors.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "auth.max_failures_per_ip",
            "auth.lockout",
            "auth.max_tracked",
            "auth.hash_concurrency"
        ]
    );
}

#[test]
fn check_config_names_the_users_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users.toml");
    std::fs::write(
        &users,
        "[[user]]\nname = \"alice\"\npassword = \"plaintext\"\n",
    )
    .unwrap();
    let extra = format!("[auth]\nusers_file = {:?}\n", users.display().to_string());
    let errors = runtime(&extra).unwrap_err();
    assert_eq!(errors[0].key, "auth.users_file");
    assert!(
        errors[0]
            .message
            .starts_with(&format!("{} line 2: password", users.display())),
        "{}",
        errors[0]
    );
}

#[test]
fn who_may_send_as_what() {
    let rt = runtime("").unwrap();
    let alice = AuthenticatedUser {
        name: "alice".into(),
        via: Via::Password,
        addresses: vec!["a.smith@example.test".into()],
        allowed_senders: vec!["@corp.example".into(), "boss@example.test".into()],
    };
    for ok in [
        "alice@example.test",
        "Alice@Example.Test",
        "alice+news@example.test",
        "a.smith@example.test",
        "boss@example.test",
        "anyone@corp.example",
        // An alias that reaches her mailbox is hers (RFC 6409 sender rules).
        "team@example.test",
    ] {
        assert!(alice.may_send_as(ok, &rt), "{ok}");
    }
    for refused in [
        "bob@example.test",
        "alice@other.test",
        "",
        "alice",
        "@corp.example",
        "x@sub.corp.example",
    ] {
        assert!(!alice.may_send_as(refused, &rt), "{refused}");
    }
    let bob = AuthenticatedUser {
        name: "bob".into(),
        via: Via::Password,
        addresses: vec![],
        allowed_senders: vec![],
    };
    assert!(!bob.may_send_as("alice@example.test", &rt));
}

#[test]
fn outcomes_and_replies() {
    let success = LoginOutcome::Success(AuthenticatedUser {
        name: "a".into(),
        via: Via::Password,
        addresses: vec![],
        allowed_senders: vec![],
    });
    let table = [
        (success, 235, "2.7.0", false),
        (LoginOutcome::Invalid, 535, "5.7.8", false),
        (LoginOutcome::AccountThrottled, 454, "4.7.0", false),
        (LoginOutcome::ClientLocked, 421, "4.7.0", true),
        (LoginOutcome::Held, 454, "4.7.0", false),
        (LoginOutcome::Unavailable, 454, "4.7.0", false),
        (LoginOutcome::Malformed, 501, "5.5.2", false),
    ];
    for (outcome, code, enhanced, disconnect) in table {
        let r = outcome.reply();
        assert_eq!(
            (r.code, r.enhanced, r.disconnect),
            (code, enhanced, disconnect),
            "{outcome:?}"
        );
    }
    let _ = user("x", "y");
}
