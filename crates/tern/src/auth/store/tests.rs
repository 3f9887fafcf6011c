use super::*;
use crate::auth::testutil::{add_app_password, user};
use std::os::unix::fs::PermissionsExt;

fn full_user() -> UserRecord {
    let mut u = user("Alice", "correct horse");
    u.addresses = vec!["alice@example.test".into()];
    u.allowed_senders = vec!["@example.test".into(), "boss@example.test".into()];
    u.held = Some(Held {
        reason: "sent 500 messages in 5 minutes".into(),
        since: "2026-12-07T10:00:00Z".into(),
    });
    add_app_password(&mut u, "phone");
    add_app_password(&mut u, "laptop");
    u
}

#[test]
fn round_trip_and_case_insensitive_names() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub/users.toml");
    let mut imported = UserRecord::new("bob");
    imported.password = Some(
        StoredHash::parse("$6$saltsalt$qFmFH.bQmmtXzyBY0s9v7Oicd2z4XSIecDzlB5KiA2/jctKu9YterLp8wwnSq.qc.eoxqOmSuNp2xS0ktL3nh/").unwrap(),
    );
    Users::edit(&path, |users| {
        users.put(full_user());
        users.put(imported.clone());
        Ok(())
    })
    .unwrap()
    .unwrap();
    let text = fs::read_to_string(&path).unwrap();
    assert!(!text.contains("correct horse"));
    assert!(text.contains("[[user.app_password]]"), "{text}");
    let users = Users::load(&path).unwrap();
    assert_eq!(users.len(), 2);
    assert!(users.decoy_key().is_some_and(|k| k.len() == 32));
    let alice = users.get("ALICE").unwrap();
    assert_eq!(alice.name, "Alice");
    let mut expected = full_user();
    // Hashes and keys are random per call: compare the parsed file with itself.
    expected.password = alice.password.clone();
    expected.scram_salt = alice.scram_salt.clone();
    expected.password_scram = alice.password_scram.clone();
    expected.app_passwords = alice.app_passwords.clone();
    assert_eq!(**alice, expected);
    assert_eq!(alice.app_passwords.len(), 2);
    assert!(alice.app_passwords.iter().all(|a| a.scram.is_some()));
    assert_eq!(**users.get("bob").unwrap(), imported);
    // Written back unchanged.
    let again = Users::parse(&users.to_toml().unwrap(), &path).unwrap();
    assert_eq!(again.get("alice"), users.get("alice"));
    // Mode 0600, no temporary file left.
    let mode = fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let names: Vec<_> = fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(names.iter().all(|n| !n.contains(".tmp.")), "{names:?}");
}

#[test]
fn errors_name_the_file_and_line() {
    let path = Path::new("/etc/tern/users.toml");
    let err = Users::parse("[[user]]\nname = \"a\"\npassword = \n", path).unwrap_err();
    assert_eq!(err.line, Some(3), "{err}");
    assert!(
        err.to_string().starts_with("/etc/tern/users.toml line 3: "),
        "{err}"
    );

    let text = "[[user]]\nname = \"a\"\n\n[[user]]\nname = \"b\"\npassword = \"plaintext\"\n";
    let err = Users::parse(text, path).unwrap_err();
    assert_eq!(err.line, Some(5), "{err}");
    assert!(err.message.contains("password"), "{err}");

    let text = "[[user]]\nname = \"a\"\n[[user]]\nname = \"A\"\n";
    let err = Users::parse(text, path).unwrap_err();
    assert_eq!(err.line, Some(4), "{err}");
    assert!(err.message.contains("twice"), "{err}");

    let err = Users::parse("[[user]]\nname = \"a\"\npasword = \"x\"\n", path).unwrap_err();
    assert_eq!(err.line, Some(3), "{err}");

    for (text, what) in [
        ("[[user]]\nname = \"a b\"\n", "name"),
        (
            "[[user]]\nname = \"a\"\naddresses = [\"nope\"]\n",
            "addresses",
        ),
        (
            "[[user]]\nname = \"a\"\nallowed_senders = [\"@\"]\n",
            "allowed_senders",
        ),
        (
            "[[user]]\nname = \"a\"\nscram_salt = \"AAAA\"\n",
            "scram_iterations",
        ),
        (
            "[[user]]\nname = \"a\"\nscram_salt = \"AAAA\"\nscram_iterations = 10\n",
            "iteration",
        ),
        (
            "[[user]]\nname = \"a\"\n[user.held]\nreason = \"x\"\nsince = \"yesterday\"\n",
            "RFC 3339",
        ),
    ] {
        let err = Users::parse(text, path).unwrap_err();
        assert!(err.message.contains(what), "{text}: {err}");
        assert_eq!(err.line, Some(2), "{text}: {err}");
    }
    assert!(
        Users::load(Path::new("/nonexistent/users.toml"))
            .unwrap()
            .is_empty()
    );
}

#[test]
fn the_server_sees_changes_at_once_and_keeps_a_good_version() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("users.toml");
    let store = UserStore::open(&path).unwrap();
    assert!(store.snapshot().is_empty());
    let t0 = Instant::now();
    Users::edit(&path, |u| {
        u.put(user("alice", "pw"));
        Ok(())
    })
    .unwrap()
    .unwrap();
    // The next login sees it.
    let t1 = t0 + Duration::from_millis(1);
    assert!(store.snapshot_at(t1).get("alice").is_some());
    assert_eq!(store.reloads(), 1);
    // Unchanged file: no re-read.
    store.snapshot_at(t1 + Duration::from_secs(5));
    assert_eq!(store.reloads(), 1);
    // A broken version: the previous one stays.
    fs::write(&path, "[[user]\n").unwrap();
    let users = store.snapshot_at(t1 + Duration::from_secs(10));
    assert!(users.get("alice").is_some());
    assert_eq!(store.reloads(), 1);
    // Removing a user is seen.
    fs::remove_file(&path).unwrap();
    Users::edit(&path, |u| {
        u.put(user("bob", "pw"));
        Ok(())
    })
    .unwrap()
    .unwrap();
    let users = store.snapshot_at(t1 + Duration::from_secs(20));
    assert!(users.get("alice").is_none() && users.get("bob").is_some());
}

#[test]
fn secrets_version_changes_with_any_secret() {
    let mut u = user("alice", "pw");
    let v0 = u.secrets_version();
    add_app_password(&mut u, "phone");
    let v1 = u.secrets_version();
    assert_ne!(v0, v1);
    u.app_passwords.clear();
    assert_eq!(u.secrets_version(), v0);
    u.held = Some(Held {
        reason: "x".into(),
        since: "2026-12-07T10:00:00Z".into(),
    });
    assert_eq!(
        u.secrets_version(),
        v0,
        "a hold is checked at each login, not cached"
    );
}

#[test]
fn edit_refusal_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("users.toml");
    let r: Result<(), String> = Users::edit(&path, |_| Err("no".into())).unwrap();
    assert_eq!(r, Err("no".into()));
    assert!(!path.exists());
}

#[test]
fn egress_limits_of_a_user_round_trip_and_zero_is_refused() {
    let path = Path::new("/x/users.toml");
    let text = "[[user]]\nname = \"a\"\n[user.limits]\nmax_messages_per_hour = 7\n";
    let users = Users::parse(text, path).unwrap();
    let limits = users.get("a").unwrap().limits;
    assert_eq!(limits.max_messages_per_hour, Some(7));
    assert_eq!(limits.max_recipients_per_hour, None);
    let again = Users::parse(&users.to_toml().unwrap(), path).unwrap();
    assert_eq!(again.get("a").unwrap().limits, limits);
    // A user without limits writes no table.
    let plain = Users::parse("[[user]]\nname = \"b\"\n", path).unwrap();
    assert!(!plain.to_toml().unwrap().contains("limits"));
    let err = Users::parse(
        "[[user]]\nname = \"a\"\n[user.limits]\nmax_recipients_per_hour = 0\n",
        path,
    )
    .unwrap_err();
    assert!(err.message.contains("limits"), "{err}");
    let err = Users::parse(
        "[[user]]\nname = \"a\"\n[user.limits]\nmax_mesages_per_hour = 1\n",
        path,
    )
    .unwrap_err();
    assert!(err.to_string().contains("max_mesages_per_hour"), "{err}");
}
